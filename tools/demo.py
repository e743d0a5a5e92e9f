"""The demo tools, loadable by path: ``agentloop run "..." --tools tools/demo.py``.

They live in the package (``agentloop.demo_tools``) because the bundled model was trained
on exactly their outputs; this file is the editable entry point most examples name.
"""

from agentloop.demo_tools import (TOOLS, add_note, calculator, convert_units, get_time, get_weather,  # noqa: F401
                                  list_files, list_notes, read_file, write_file)
