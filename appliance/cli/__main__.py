"""`python -m appliance.cli`: the `meshpi` command."""

import sys

from appliance.cli import main

sys.exit(main())
