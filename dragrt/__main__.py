from dragrt.cli import main

raise SystemExit(main())
