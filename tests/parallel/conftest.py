import sys
from pathlib import Path

# tests and torchrun workers import the shared helpers as a plain module
sys.path.insert(0, str(Path(__file__).parent))
