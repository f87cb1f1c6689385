from nonlocalnet.cli import main

raise SystemExit(main())
