from snapcoord.cli import main

raise SystemExit(main())
