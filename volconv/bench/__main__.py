"""``python -m volconv.bench``: see :func:`volconv.bench.main`."""

from volconv.bench import main

raise SystemExit(main())
