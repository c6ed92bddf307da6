"""Every benchmark, one after the other; each prints its own figures."""

import subprocess
import sys
from pathlib import Path

here = Path(__file__).parent
for script in (
    "p1_import_cost.py",
    "p2_materialize.py",
    "p3_sensor_tick.py",
    "p4_vertex_polling.py",
    "p5_dbt_parse.py",
    "p7_dbt_steps.py",
    "p8_backfill.py",
    "p9_ui_launch.py",
):
    subprocess.run([sys.executable, str(here / script)], check=True, cwd=here)
