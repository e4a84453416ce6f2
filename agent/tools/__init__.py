"""Tools that measure and build the agent (bench, eval, flicker, convert, train): imported only by
their own subcommands, never by `emotion-agent run`."""
