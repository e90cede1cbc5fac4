from bonefrac.cli import main

raise SystemExit(main())
