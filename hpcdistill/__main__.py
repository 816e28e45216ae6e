from hpcdistill.cli import main

raise SystemExit(main())
