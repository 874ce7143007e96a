// The example page in a real browser (Debian's chromium, headless), against a gateway under
// examples/web/policy.toml. Run by tests/browser.rs:
//   node registration.mjs URL SERVICES_DIR FERRY DATA_DIR SECRET_FILE
//
// 1. Anonymously, a user registers (the password sealed); the page shows the user id it made.
// 2. The user signs in with a token for that id (`ferry token`, as an identity provider would
//    issue it) and sees UserRegistered arrive over the WebSocket.
// 3. The user service is stopped (its component moved out of the services folder; the host
//    unloads it), the name is changed, the service is started again: NameChanged and the
//    service's NotifyUser notification arrive, each once.
// 4. Another user, signed in in another browser context, may neither follow the first user's
//    streams nor send to them, and never sees the first user's notification.
// 5. A taken username is refused before anything is sent, anonymously.
// Prints `user-id: ID` for the Rust test's checks of the store, and `ok` at the end.
import { chromium } from "playwright-core";
import { execFile } from "node:child_process";
import { rename } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";

const [url, services, ferry, data, secretFile] = process.argv.slice(2);
const run = promisify(execFile);

// The gateway does not list services: ask the host through the CLI.
async function runningServices() {
  const args = ["--data", data, "--services", services, "--json", "services"];
  const { stdout } = await run(ferry, args);
  return JSON.parse(stdout).services.map((service) => service.name);
}

// The host lists a removed service until its consumers have stopped.
async function waitUntilStopped(name, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while ((await runningServices()).includes(name)) {
    if (Date.now() > deadline) {
      throw new Error(`the ${name} service still runs ${timeoutMs} ms after its component was moved away`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

// What an identity provider would hand the user after signing in: a token for the user id.
async function tokenFor(sub) {
  const { stdout } = await run(ferry, ["token", "--sub", sub, "--secret-file", secretFile, "--ttl", "1h"]);
  return stdout.trim();
}

async function signIn(page, token) {
  await page.fill("#signin-form textarea[name=token]", token);
  await page.click("#signin-form button[type=submit]");
  await page.waitForSelector("#welcome:not([hidden])");
}

async function types(page, list) {
  return page.$$eval(`#${list} li`, (items) => items.map((i) => i.dataset.type));
}

async function noError(page) {
  const error = await page.textContent("#error");
  if (error) throw new Error("the page shows an error: " + error);
}

// From inside a page: opens a WebSocket (with `token`, or none), follows each stream from 0 and
// returns every frame received within `ms`.
async function tryToFollow(page, token, streams, ms) {
  return page.evaluate(
    ({ token, streams, ms }) =>
      new Promise((resolve, reject) => {
        const query = token ? "?token=" + encodeURIComponent(token) : "";
        const socket = new WebSocket("ws://" + location.host + "/ws" + query);
        const frames = [];
        socket.onerror = () => reject(new Error("the WebSocket failed"));
        socket.onopen = () => {
          for (const stream of streams) socket.send(JSON.stringify({ follow: stream, from: 0 }));
          setTimeout(() => {
            socket.close();
            resolve(frames);
          }, ms);
        };
        socket.onmessage = (frame) => frames.push(JSON.parse(frame.data));
      }),
    { token, streams, ms },
  );
}

// Each stream refused with an error frame naming it, and nothing else received.
function expectRefused(frames, streams, who) {
  const refused = frames.filter((f) => f.error && f.follow).map((f) => f.follow).sort();
  if (JSON.stringify(refused) !== JSON.stringify([...streams].sort()) || frames.length !== streams.length) {
    throw new Error(`${who} was not refused each follow, and only that: ${JSON.stringify(frames)}`);
  }
}

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const step = (text) => console.log("step:", text);
const watch = (page, who) => page.on("console", (message) => console.log(`page (${who}):`, message.text()));
try {
  const ann = await (await browser.newContext()).newPage();
  watch(ann, "ann");
  await ann.goto(url);

  step("register anonymously");
  await ann.fill("input[name=username]", "ann");
  await ann.fill("input[name=email]", "ann@example.com");
  await ann.fill("input[name=password]", "correct horse battery staple");
  await ann.fill("#register-form input[name=firstName]", "Ann");
  await ann.fill("#register-form input[name=lastName]", "Lee");
  await ann.click("#register-form button[type=submit]");
  await ann.waitForSelector("#signin:not([hidden])");
  await noError(ann);
  const userId = (await ann.textContent("#user-id")).trim();
  if (!/^[0-9a-f-]{36}$/.test(userId)) throw new Error("the page shows no user id: " + JSON.stringify(userId));
  console.log("user-id:", userId);

  step("sign in with a token for the user id");
  const annToken = await tokenFor(userId);
  await signIn(ann, annToken);
  await ann.waitForSelector("#events li[data-type=UserRegistered]", { timeout: 30000 });
  await noError(ann);

  step("stop the user service");
  const component = join(services, "user.wasm");
  const parked = join(services, "..", "user.wasm.away");
  await rename(component, parked);
  await waitUntilStopped("user", 30000);

  step("change the name while it is down");
  await ann.fill("#name-form input[name=firstName]", "Annie");
  await ann.fill("#name-form input[name=lastName]", "Lee");
  await ann.click("#name-form button[type=submit]");
  await new Promise((resolve) => setTimeout(resolve, 1000));
  if (await ann.$("#events li[data-type=NameChanged]")) {
    throw new Error("NameChanged appeared while the user service was stopped");
  }
  await noError(ann);

  step("start the user service again");
  await rename(parked, component);
  await ann.waitForSelector("#events li[data-type=NameChanged]", { timeout: 30000 });
  await ann.waitForSelector("#notifications li[data-type=NotifyUser]", { timeout: 30000 });
  const welcome = await ann.textContent("#welcome-name");
  if (welcome !== "Annie") throw new Error("the welcome shows " + welcome);
  // Anything pushed twice would have arrived by now.
  await new Promise((resolve) => setTimeout(resolve, 500));
  const events = await types(ann, "events");
  const notifications = await types(ann, "notifications");
  console.log("events:", JSON.stringify(events), "notifications:", JSON.stringify(notifications));
  if (JSON.stringify(events) !== JSON.stringify(["UserRegistered", "NameChanged"])) {
    throw new Error("expected each event once, in order: " + JSON.stringify(events));
  }
  if (JSON.stringify(notifications) !== JSON.stringify(["NotifyUser"])) {
    throw new Error("expected the one notification: " + JSON.stringify(notifications));
  }
  const notification = await ann.textContent("#notifications li");
  if (!notification.includes("Annie Lee")) throw new Error("the notification shows " + notification);
  await noError(ann);

  step("another user may not follow the first user's streams");
  const other = await (await browser.newContext()).newPage();
  watch(other, "other");
  await other.goto(url);
  await other.click("#to-signin");
  const otherToken = await tokenFor("other-id");
  await signIn(other, otherToken);
  const annStreams = ["socket-notification:command." + userId, "user." + userId];
  expectRefused(await tryToFollow(other, otherToken, annStreams, 1500), annStreams, "another user");
  expectRefused(await tryToFollow(other, null, annStreams, 1000), annStreams, "an anonymous client");
  const { status } = await other.evaluate(
    async ({ userId, token }) => {
      const response = await fetch("/streams/user:command." + userId, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: "Bearer " + token },
        body: JSON.stringify({ type: "ChangeName", data: { firstName: "Mallory", lastName: "X" } }),
      });
      return { status: response.status };
    },
    { userId, token: otherToken },
  );
  if (status !== 403) throw new Error("another user's ChangeName was answered " + status);
  // The other user's own page follows their own (empty) streams, refused nothing.
  if ((await types(other, "notifications")).length || (await types(other, "events")).length) {
    throw new Error("the other user's page shows messages that are not theirs");
  }
  await noError(other);

  step("a taken username is refused before sending, anonymously");
  const third = await (await browser.newContext()).newPage();
  watch(third, "third");
  await third.goto(url);
  await third.fill("input[name=username]", "ANN");
  await third.fill("input[name=email]", "other@example.com");
  await third.fill("input[name=password]", "pw");
  await third.fill("#register-form input[name=firstName]", "Other");
  await third.fill("#register-form input[name=lastName]", "Person");
  await third.click("#register-form button[type=submit]");
  await third.waitForFunction(() => document.getElementById("username-status").textContent.includes("taken"));
  if (!(await third.isHidden("#signin"))) throw new Error("a taken username was sent");
  await noError(third);
  console.log("ok");
} finally {
  await browser.close();
}
