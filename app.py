"""Start the studio: `python app.py [--listen] [--port 7860] [--nowebui] ...` (A1111 flag names)."""

import logging

from studio.config import force_offline, parse_flags
from studio.server import serve


def main() -> None:
    force_offline()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(parse_flags())


if __name__ == "__main__":
    main()
