"""Trust: TLS probing of servers, certificates, the exported trust bundle."""
