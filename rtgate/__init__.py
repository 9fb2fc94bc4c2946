"""rtgate: the command line that runs the gateway and broker services."""
