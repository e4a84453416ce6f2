"""`python -m agent.flicker`, as published before the tools moved: runs agent.tools.flicker."""

if __name__ == "__main__":
    from agent.tools.flicker import main

    raise SystemExit(main())
