"""The {{name}} service, in Python. It owns the streams `{{name}}.<id>` and the commands on
`{{name}}:command.<id>`:

- `Add { amount }` -> `Added { amount, total }` on the entity's stream, the total folded from its
  earlier events by `project`;
- every `Added` event keeps the entity's total in the view `{{name}}-totals`.

A handler only decides: it returns the messages to write and the view rows to change. The bindings
come from `wit_world`; field names are snake_case; a failure is raised as
`Err(Failure_Permanent(...))` or `Err(Failure_Transient(...))`.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports.types import (
    Failure_Permanent,
    Message,
    Outcome,
    Outgoing,
    ServiceManifest,
    Subscription,
    ViewChange_Upsert,
    ViewRow,
)

NAME = "{{name}}"
TOTALS = "{{name}}-totals"


def permanent(reason: str) -> Err:
    return Err(Failure_Permanent(reason))


def parse(text: str, what: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise permanent(f"{what}: {e}") from None


def to_json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def entity(stream: str) -> str:
    """The part of a stream name after the first `.`: the entity."""
    return stream.split(".", 1)[1] if "." in stream else ""


def total_of(state) -> int:
    return 0 if state is None else parse(state, "state")["total"]


def guarded(handler):
    """Any exception that is not a chosen failure (a bug) parks the message, naming it."""

    def run(*args):
        try:
            return handler(*args)
        except Err:
            raise
        except Exception as e:
            raise permanent(f"unexpected error: {e!r}") from None

    return run


class Handler(exports.Handler):
    def manifest(self) -> ServiceManifest:
        return ServiceManifest(
            name=NAME,
            handles_commands=True,
            subscriptions=[Subscription(category=NAME, origin_prefix=None)],
            views=[TOTALS],
        )

    @guarded
    def project(self, state, event: Message) -> str:
        total = total_of(state)
        if event.message_type == "Added":
            total = parse(event.data, "Added")["total"]
        return to_json({"total": total})

    @guarded
    def handle_command(self, command: Message, state) -> Outcome:
        if command.message_type != "Add":
            raise permanent(f"unknown command {command.message_type}")
        amount = parse(command.data, "Add").get("amount")
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise permanent("Add needs an integer `amount`")
        total = total_of(state) + amount
        added = Outgoing(
            stream_name=f"{NAME}.{entity(command.stream_name)}",
            message_type="Added",
            data=to_json({"amount": amount, "total": total}),
            metadata=None,
            not_before_ms=None,
        )
        return Outcome(messages=[added], views=[])

    @guarded
    def handle_event(self, event: Message, state) -> Outcome:
        if event.message_type != "Added":
            return Outcome(messages=[], views=[])
        total = parse(event.data, "Added")["total"]
        row = ViewRow(table=TOTALS, key=entity(event.stream_name), value=to_json({"total": total}))
        return Outcome(messages=[], views=[ViewChange_Upsert(row)])
