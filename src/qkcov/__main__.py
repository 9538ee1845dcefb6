import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the CLI itself is being imported
    name = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    print(f"qkcov {name}: interrupted" if name else "qkcov: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
