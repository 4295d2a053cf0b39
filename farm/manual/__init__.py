"""The manual's interface: the stap-server command line, configuration files, planning,
rendering, stat files, and the farm's own actions."""
