"""`python -m agent.convert_detector`, as published before the tools moved: runs agent.tools.convert_detector."""

if __name__ == "__main__":
    from agent.tools.convert_detector import main

    raise SystemExit(main())
