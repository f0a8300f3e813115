"""The operator's admin page data: `queries` reads every account's usage (SQL), `report` turns
it into totals, a series and top lists (pure), `serving` guards the route (CCPROXY_ADMIN_TOKEN).
The page itself is static: ccproxy/web/admin.html and admin.js."""
