"""dynamo adapter: not implemented yet, so it registers nothing (see the issue tracker)."""
