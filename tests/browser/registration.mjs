// Registers a user on the example page in a real browser (Debian's chromium, headless), changes
// the name, and checks that both events appear live, while the user service is stopped and
// started again between the two steps (its component moved out of and back into the services
// folder; the host reloads it). Run by tests/browser.rs:
//   node registration.mjs URL SERVICES_DIR FERRY DATA_DIR
import { chromium } from "playwright-core";
import { execFile } from "node:child_process";
import { rename } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";

const [url, services, ferry, data] = process.argv.slice(2);

// The gateway does not list services: ask the host through the CLI.
async function runningServices() {
  const args = ["--data", data, "--services", services, "--json", "services"];
  const { stdout } = await promisify(execFile)(ferry, args);
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

const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const step = (text) => console.log("step:", text);
try {
  const page = await browser.newPage();
  page.on("console", (message) => console.log("page:", message.text()));
  await page.goto(url);

  step("register");
  await page.fill("input[name=username]", "ann");
  await page.fill("input[name=email]", "ann@example.com");
  await page.fill("input[name=password]", "correct horse battery staple");
  await page.fill("#register-form input[name=firstName]", "Ann");
  await page.fill("#register-form input[name=lastName]", "Lee");
  await page.click("#register-form button");
  await page.waitForSelector("#welcome:not([hidden])");
  await page.waitForSelector("#events li[data-type=UserRegistered]", { timeout: 30000 });

  step("stop the user service");
  const component = join(services, "user.wasm");
  const parked = join(services, "..", "user.wasm.away");
  await rename(component, parked);
  await waitUntilStopped("user", 30000);

  step("change the name while it is down");
  await page.fill("#name-form input[name=firstName]", "Annie");
  await page.fill("#name-form input[name=lastName]", "Lee");
  await page.click("#name-form button");
  await new Promise((resolve) => setTimeout(resolve, 1000));
  if (await page.$("#events li[data-type=NameChanged]")) {
    throw new Error("NameChanged appeared while the user service was stopped");
  }
  const error = await page.textContent("#error");
  if (error) throw new Error("the page shows an error: " + error);

  step("start the user service again");
  await rename(parked, component);
  await page.waitForSelector("#events li[data-type=NameChanged]", { timeout: 30000 });
  const welcome = await page.textContent("#welcome-name");
  if (welcome !== "Annie") throw new Error("the welcome shows " + welcome);
  const events = await page.$$eval("#events li", (items) => items.map((i) => i.dataset.type));
  console.log("events:", JSON.stringify(events));
  if (JSON.stringify(events) !== JSON.stringify(["UserRegistered", "NameChanged"])) {
    throw new Error("expected each event once, in order: " + JSON.stringify(events));
  }

  step("a taken username is refused before sending");
  const second = await browser.newPage();
  await second.goto(url);
  await second.fill("input[name=username]", "ANN");
  await second.fill("input[name=email]", "other@example.com");
  await second.fill("input[name=password]", "pw");
  await second.fill("#register-form input[name=firstName]", "Other");
  await second.fill("#register-form input[name=lastName]", "Person");
  await second.click("#register-form button");
  await second.waitForFunction(() => document.getElementById("username-status").textContent.includes("taken"));
  if (!(await second.isHidden("#welcome"))) throw new Error("a taken username was sent");
  console.log("ok");
} finally {
  await browser.close();
}
