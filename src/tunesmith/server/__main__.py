"""``python -m tunesmith.server serve|jobs ...``"""

from .commands import main

main()
