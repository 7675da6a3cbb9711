"""The process layer: the supervisor and its workers, the HTTP server and its connections, the
tables the workers share."""
