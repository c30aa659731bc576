"""manage.py publish: send a message from the server to a user's tabs or a room's members."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from clients.errors import NotFound, ServiceError
from messaging.publishing import publish
from messaging.wire import parse_json

# Exit codes besides 0 (published, or already published under this key).
EXIT_REFUSED = 1  # bad input: the target's spelling, the JSON, the key
EXIT_UNKNOWN = 2  # no such user or room


class Command(BaseCommand):
    """
    Publish one message as the server (messaging.publishing.publish).
    """

    help = (
        "Send a message from the server to every tab of a user (--to user:NAME) or of every "
        "member of a room (--to room:NAME), stored and queued like a tab's message, and pushed to "
        "the tabs that are connected (through the channel layer: with the in-memory layer of "
        "development, connected tabs find it at their next ping or reconnect). Prints the "
        "message id. Exit status: 0 published (or already published under --key), "
        f"{EXIT_REFUSED} bad input, {EXIT_UNKNOWN} unknown user or room."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--to", required=True, metavar="TARGET", help="user:NAME or room:NAME")
        parser.add_argument(
            "--body",
            required=True,
            metavar="JSON",
            help='the message body, any JSON value, e.g. \'{"text": "Back at 3"}\'',
        )
        parser.add_argument(
            "--key",
            metavar="K",
            help="an idempotency key: a second publish with the same key stores nothing new",
        )
        parser.add_argument(
            "--sender",
            metavar="LABEL",
            help="the sender label shown as from.server (default: MESSAGING_SERVER_SENDER)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            body = parse_json(options["body"])
        except ServiceError as exc:
            raise CommandError(
                f"--body is not valid JSON: {exc.detail}", returncode=EXIT_REFUSED
            ) from None
        try:
            result = publish(options["to"], body, key=options["key"], sender=options["sender"])
        except NotFound as exc:
            raise CommandError(exc.detail, returncode=EXIT_UNKNOWN) from None
        except ServiceError as exc:
            raise CommandError(exc.detail, returncode=EXIT_REFUSED) from None
        if result.duplicate:
            self.stdout.write(f"message {result.id} was already published with this key")
        else:
            self.stdout.write(f"published message {result.id}")
