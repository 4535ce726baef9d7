from fastllm.cli import main

raise SystemExit(main())
