from dtwin.cli import main

raise SystemExit(main())
