"""One adapter per wire format: parse a request's conversation into neutral turns
(``ccproxy.compression.conversation``) and render the compressor's edits back into that format.
Each module has ``parse`` and ``render``; nothing else of the API reaches the compression core."""
