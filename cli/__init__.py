"""The `bdiff` command line: parses, calls the engine, prints."""
