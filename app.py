"""Start the studio: `python app.py [--listen] [--port 7860] [--nowebui] ...` (A1111 flag names)."""

import logging

from studio.api.auth import check_flags
from studio.config import force_offline, parse_flags
from studio.server import serve


def main() -> None:
    force_offline()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = parse_flags()
    check_flags(flags)  # a malformed --api-auth or CORS regex stops here, before models and the UI load
    serve(flags)


if __name__ == "__main__":
    main()
