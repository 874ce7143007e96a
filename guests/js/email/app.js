// The email service of the article, in JavaScript: a twin of the Rust `guests/email`. It owns
// `email` and `email:command`.
//
// - `SendEmail { id, from, to, subject, body }` on `email:command.<id>`: projects `email.<id>`;
//   when the email was sent already it does nothing, otherwise it delivers it (the host's mail
//   capability, idempotent per id) and writes `EmailSent`, which carries the command's
//   `originEntity` (the host copies it).
// - `RecordEmailOpened { id, timestamp }` (what the provider's webhook becomes) → `EmailOpened`,
//   with the `originEntity` of the email it belongs to.
//
// Built with componentize-js (see scripts/build-polyglot). Imports are ES modules named after
// the WIT interfaces; record fields are camelCase (`messageType`, `streamName`); u64 values are
// BigInt; an option is a value or `undefined`. An export returning `result<T, failure>` returns
// `T`, or throws an object whose `payload` is the failure variant (`{ tag: 'permanent', val }`).
// An imported function returning `result<_, string>` throws an error whose `payload` is the
// host's reason.

import { log } from 'ferry:service/host@0.1.0';
import { deliver } from 'ferry:service/mail@0.1.0';

// ---------------------------------------------------------------------------------------------
// A few helpers that do what the Rust SDK (guests/sdk) does for its services.

class Failure extends Error {
  constructor(tag, reason) {
    super(reason);
    // What componentize-js lowers as the `err` case of the result.
    this.payload = { tag, val: reason };
  }
}

const permanent = (reason) => new Failure('permanent', reason);
const transient = (reason) => new Failure('transient', reason);

function parse(text, what) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw permanent(`${what} is not valid JSON: ${e.message}`);
  }
}

/** The message with its data and metadata parsed, as the SDK's `Message`. */
function message(wit) {
  return {
    id: wit.id,
    stream: wit.streamName,
    type: wit.messageType,
    data: parse(wit.data, 'data'),
    metadata: parse(wit.metadata, 'metadata'),
    // The part of the stream name after the first `.`.
    entityId: wit.streamName.includes('.')
      ? wit.streamName.slice(wit.streamName.indexOf('.') + 1)
      : '',
  };
}

function isObject(value) {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** A JSON value as serde names it in an error (`integer \`5\``). */
function describe(value) {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'sequence';
  switch (typeof value) {
    case 'boolean':
      return `boolean \`${value}\``;
    case 'number':
      return Number.isInteger(value) ? `integer \`${value}\`` : `floating point \`${value}\``;
    case 'string':
      return `string ${JSON.stringify(value)}`;
    default:
      return 'map';
  }
}

/** The named string fields of a JSON object, all required (as a serde struct of Strings). */
function fields(value, names, what, struct) {
  if (!isObject(value)) {
    throw permanent(`${what}: invalid type: ${describe(value)}, expected struct ${struct}`);
  }
  const out = {};
  for (const name of names) {
    if (!Object.hasOwn(value, name)) throw permanent(`${what}: missing field \`${name}\``);
    if (typeof value[name] !== 'string') {
      throw permanent(`${what}: invalid type: ${describe(value[name])}, expected a string`);
    }
    out[name] = value[name];
  }
  return out;
}

/** A message to write; `metadata` (an object) is merged by the host over the propagated keys. */
function write(streamName, messageType, data, metadata) {
  return {
    streamName,
    messageType,
    data: JSON.stringify(data),
    metadata: metadata === undefined ? undefined : JSON.stringify(metadata),
    notBeforeMs: undefined,
  };
}

const outcome = (...messages) => ({ messages, views: [] });

/**
 * Runs a handler. A `Failure` becomes the `err` case; any other exception (a bug) becomes a
 * permanent failure naming it, where a Rust panic would trap: the host parks the message either
 * way.
 */
function run(handler) {
  try {
    return handler();
  } catch (e) {
    if (e instanceof Failure) throw e;
    throw permanent(`unexpected error: ${e && e.message ? e.message : String(e)}`);
  }
}

// ---------------------------------------------------------------------------------------------
// The service.

const EMAIL = ['id', 'from', 'to', 'subject', 'body'];

const defaultState = () => ({ isEmailSent: false, isEmailOpened: false, originEntity: null });

function state(text) {
  if (text === undefined || text === null) return defaultState();
  const parsed = parse(text, 'state');
  if (!isObject(parsed)) {
    const found = describe(parsed);
    throw permanent(`state is not valid JSON: invalid type: ${found}, expected struct EmailState`);
  }
  return {
    isEmailSent: parsed.isEmailSent === true,
    isEmailOpened: parsed.isEmailOpened === true,
    originEntity: typeof parsed.originEntity === 'string' ? parsed.originEntity : null,
  };
}

/** RFC 5322 text of an email; header values are kept on one line. */
function rfc5322(email) {
  const oneLine = (text) => text.replace(/[\r\n]/g, ' ');
  const body = email.body.replaceAll('\r\n', '\n').replaceAll('\n', '\r\n');
  return (
    `Message-ID: <${oneLine(email.id)}@ferry.local>\r\n` +
    `From: ${oneLine(email.from)}\r\n` +
    `To: ${oneLine(email.to)}\r\n` +
    `Subject: ${oneLine(email.subject)}\r\n` +
    'MIME-Version: 1.0\r\n' +
    'Content-Type: text/plain; charset=utf-8\r\n' +
    `\r\n${body}\r\n`
  );
}

function sendEmail(command, current, stream) {
  if (current.isEmailSent) {
    log('info', `email ${command.entityId} was sent already`);
    return outcome();
  }
  const email = fields(command.data, EMAIL, 'SendEmail data', 'Email');
  if (email.id !== command.entityId) {
    throw permanent(`SendEmail for ${email.id} arrived on ${command.stream}`);
  }
  try {
    deliver(email.id, rfc5322(email));
  } catch (e) {
    throw transient(`delivery failed: ${e.payload ?? e.message}`);
  }
  return outcome(write(stream, 'EmailSent', email));
}

function recordEmailOpened(command, current, stream) {
  if (!current.isEmailSent) {
    // The webhook can race the send; the host retries with backoff.
    throw transient(`email ${command.entityId} is not sent yet`);
  }
  if (current.isEmailOpened) return outcome();
  const opened = command.data;
  if (!isObject(opened)) {
    throw permanent(
      `RecordEmailOpened data: invalid type: ${describe(opened)}, expected struct EmailOpened`,
    );
  }
  const timestamp = opened.timestamp ?? null;
  if (timestamp !== null && typeof timestamp !== 'string') {
    throw permanent(
      `RecordEmailOpened data: invalid type: ${describe(timestamp)}, expected a string`,
    );
  }
  const metadata = {};
  if (current.originEntity !== null) metadata.originEntity = current.originEntity;
  return outcome(
    write(stream, 'EmailOpened', { id: command.entityId, timestamp }, metadata),
  );
}

export const handler = {
  manifest() {
    return { name: 'email', handlesCommands: true, subscriptions: [], views: [] };
  },

  project(stateText, event) {
    return run(() => {
      const next = state(stateText);
      const e = message(event);
      if (e.type === 'EmailSent') {
        next.isEmailSent = true;
        const origin = isObject(e.metadata) ? e.metadata.originEntity : undefined;
        next.originEntity = typeof origin === 'string' ? origin : null;
      } else if (e.type === 'EmailOpened') {
        next.isEmailOpened = true;
      }
      return JSON.stringify(next);
    });
  },

  handleCommand(wit, stateText) {
    return run(() => {
      const command = message(wit);
      const current = state(stateText);
      const stream = `email.${command.entityId}`;
      switch (command.type) {
        case 'SendEmail':
          return sendEmail(command, current, stream);
        case 'RecordEmailOpened':
          return recordEmailOpened(command, current, stream);
        default:
          throw permanent(`unknown command ${command.type}`);
      }
    });
  },

  handleEvent(wit, stateText) {
    return run(() => {
      message(wit);
      state(stateText);
      return outcome();
    });
  },
};
