from ccproxy.cli import main

main()
