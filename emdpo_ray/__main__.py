import sys

from emdpo_ray.cli import main

sys.exit(main())
