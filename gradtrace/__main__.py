from gradtrace.cli import main

raise SystemExit(main())
