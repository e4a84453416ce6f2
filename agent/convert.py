"""`python -m agent.convert`, as published before the tools moved: runs agent.tools.convert."""

if __name__ == "__main__":
    from agent.tools.convert import main

    raise SystemExit(main())
