from nlistral.cli import main

raise SystemExit(main())
