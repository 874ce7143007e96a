"""The users aggregator of the article, in Python: a twin of the Rust `guests/user-aggregator`.

It follows the `user` category and keeps view data, each row stamped by the host with the global
position that changed it last (`lastUpdateSeq`), so a replayed event never changes a row twice.

- `users`: user id -> `{ userId, username, email, firstName, lastName }`
- `users-by-username`: lower-cased username -> `{ userId }`
- `users-by-email`: lower-cased email -> `{ userId }`

Built with componentize-py (see scripts/build-polyglot). The bindings come from `wit_world`; field
names are snake_case (`message_type`, `stream_name`); a `result<T, failure>` is returned as `T`
or raised as `Err(Failure_Transient(...))` / `Err(Failure_Permanent(...))`, and an imported
function's error arrives as a raised `Err` whose `value` is the host's reason.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    Failure_Permanent,
    Failure_Transient,
    Message,
    Outcome,
    ServiceManifest,
    Subscription,
    ViewChange_Upsert,
    ViewRow,
)

# ---------------------------------------------------------------------------------------------
# A few helpers that do what the Rust SDK (guests/sdk) does for its services.


def permanent(reason: str) -> Err:
    return Err(Failure_Permanent(reason))


def transient(reason: str) -> Err:
    return Err(Failure_Transient(reason))


def to_json(value) -> str:
    """Compact JSON with keys in insertion order, like serde_json writes a struct."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def parse(text: str, what: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise permanent(f"{what} is not valid JSON: {e}") from None


def describe(value) -> str:
    """A JSON value as serde names it in an error (`integer `5``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{to_json(value)}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value}`"
    if isinstance(value, str):
        return f"string {to_json(value)}"
    return "sequence" if isinstance(value, list) else "map"


def fields(value, names, what: str, struct: str) -> dict:
    """The named string fields of a JSON object, all required (as a serde struct of Strings)."""
    if not isinstance(value, dict):
        raise permanent(f"{what}: invalid type: {describe(value)}, expected struct {struct}")
    out = {}
    for name in names:
        if name not in value:
            raise permanent(f"{what}: missing field `{name}`")
        if not isinstance(value[name], str):
            raise permanent(f"{what}: invalid type: {describe(value[name])}, expected a string")
        out[name] = value[name]
    return out


def upsert(table: str, key: str, value) -> ViewChange_Upsert:
    return ViewChange_Upsert(ViewRow(table=table, key=key, value=to_json(value)))


def view(table: str, key: str):
    """A row of a view table, parsed; None when there is none. A host error is transient."""
    try:
        text = host.view_get(table, key)
    except Err as e:
        raise transient(str(e.value)) from None
    return None if text is None else parse(text, "view row")


def checked(message: Message) -> Message:
    """Fails permanently when the message's data or metadata is not JSON, as the SDK does."""
    parse(message.data, "data")
    parse(message.metadata, "metadata")
    return message


def nothing() -> Outcome:
    return Outcome(messages=[], views=[])


def guarded(handler):
    """An `Err` is the failure the handler chose; any other exception (a bug) becomes a permanent
    failure naming it, where a Rust panic would trap: the host parks the message either way."""

    def run(*args):
        try:
            return handler(*args)
        except Err:
            raise
        except Exception as e:
            raise permanent(f"unexpected error: {e!r}") from None

    return run


# ---------------------------------------------------------------------------------------------
# The service.

USER_ROW = ("userId", "username", "email", "firstName", "lastName")
NAME_CHANGED = ("userId", "firstName", "lastName")


class Handler(exports.Handler):
    def manifest(self) -> ServiceManifest:
        return ServiceManifest(
            name="user-aggregator",
            handles_commands=False,
            subscriptions=[Subscription(category="user", origin_prefix=None)],
            views=["users", "users-by-username", "users-by-email"],
        )

    @guarded
    def project(self, state, event: Message) -> str:
        # The aggregator keeps no entity state (the Rust one's state is `()`).
        checked(event)
        return "null"

    def handle_command(self, command: Message, state) -> Outcome:
        raise permanent(f"unknown command {command.message_type}")

    @guarded
    def handle_event(self, event: Message, state) -> Outcome:
        checked(event)
        if event.message_type == "UserRegistered":
            data = parse(event.data, "data")
            row = fields(data, USER_ROW, "UserRegistered data", "UserRow")
            by_id = {"userId": row["userId"]}
            return Outcome(
                messages=[],
                views=[
                    upsert("users-by-username", row["username"].lower(), by_id),
                    upsert("users-by-email", row["email"].lower(), by_id),
                    upsert("users", row["userId"], row),
                ],
            )
        if event.message_type == "NameChanged":
            data = parse(event.data, "data")
            change = fields(data, NAME_CHANGED, "NameChanged data", "NameChanged")
            current = view("users", change["userId"])
            if current is None:
                return nothing()
            row = fields(current, USER_ROW, "view row is not valid JSON", "UserRow")
            row["firstName"] = change["firstName"]
            row["lastName"] = change["lastName"]
            return Outcome(messages=[], views=[upsert("users", change["userId"], row)])
        return nothing()
