// The {{name}} service, in JavaScript. It owns the streams `{{name}}.<id>` and the commands on
// `{{name}}:command.<id>`:
//
// - `Add { amount }` -> `Added { amount, total }` on the entity's stream, the total folded from
//   its earlier events by `project`;
// - every `Added` event keeps the entity's total in the view `{{name}}-totals`.
//
// A handler only decides: it returns the messages to write and the view rows to change. Record
// fields are camelCase (`messageType`, `streamName`); an option is a value or `undefined`; a
// failure is thrown as an object whose `payload` is `{ tag: 'permanent' | 'transient', val }`.

const NAME = '{{name}}';
const TOTALS = '{{name}}-totals';

class Failure extends Error {
  constructor(tag, reason) {
    super(reason);
    this.payload = { tag, val: reason };
  }
}

const permanent = (reason) => new Failure('permanent', reason);

function parse(text, what) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw permanent(`${what}: ${e.message}`);
  }
}

/** The part of a stream name after the first `.`: the entity. */
const entity = (stream) => (stream.includes('.') ? stream.slice(stream.indexOf('.') + 1) : '');

const totalOf = (state) => (state === undefined ? 0 : parse(state, 'state').total);

/** Any error that is not a chosen failure (a bug) parks the message, naming it. */
function run(handler) {
  try {
    return handler();
  } catch (e) {
    if (e instanceof Failure) throw e;
    throw permanent(`unexpected error: ${e && e.message ? e.message : String(e)}`);
  }
}

export const handler = {
  manifest() {
    return {
      name: NAME,
      handlesCommands: true,
      subscriptions: [{ category: NAME, originPrefix: undefined }],
      views: [TOTALS],
    };
  },

  project(state, event) {
    return run(() => {
      let total = totalOf(state);
      if (event.messageType === 'Added') total = parse(event.data, 'Added').total;
      return JSON.stringify({ total });
    });
  },

  handleCommand(command, state) {
    return run(() => {
      if (command.messageType !== 'Add') {
        throw permanent(`unknown command ${command.messageType}`);
      }
      const { amount } = parse(command.data, 'Add');
      if (!Number.isInteger(amount)) throw permanent('Add needs an integer `amount`');
      const total = totalOf(state) + amount;
      return {
        messages: [
          {
            streamName: `${NAME}.${entity(command.streamName)}`,
            messageType: 'Added',
            data: JSON.stringify({ amount, total }),
            metadata: undefined,
            notBeforeMs: undefined,
          },
        ],
        views: [],
      };
    });
  },

  handleEvent(event, _state) {
    return run(() => {
      if (event.messageType !== 'Added') return { messages: [], views: [] };
      const { total } = parse(event.data, 'Added');
      return {
        messages: [],
        views: [
          {
            tag: 'upsert',
            val: { table: TOTALS, key: entity(event.streamName), value: JSON.stringify({ total }) },
          },
        ],
      };
    });
  },
};
