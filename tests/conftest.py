import sys
from pathlib import Path

# helpers that several test directories share (server_thread.py) import as plain modules
sys.path.insert(0, str(Path(__file__).parent))
