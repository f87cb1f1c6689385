from nonlocalnet.bench import main

raise SystemExit(main())
