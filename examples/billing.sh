#!/usr/bin/env bash
# The article's billing flow: an overdue payment, the email, opened or not, and the follow-up
# (a discount, a cancellation, or nothing when paid). Services: subscription, email.
# FOLLOW_UP_MS sets the follow-up delay (default 3000 ms here; three days in the service).
set -euo pipefail
ferry=${FERRY:-ferry}
delay=${FOLLOW_UP_MS:-3000}

for who in opened ignored paid; do
  "$ferry" send "subscription:command.$who" MarkPaymentOverdue \
    "{\"email\":\"$who@example.com\",\"followUpAfterMs\":$delay}"
done
sleep 1
# What the email provider's webhook turns into: the "opened" customer read the email.
email_id=$("$ferry" --json read subscription.opened | python3 -c 'import json,sys; m=json.load(sys.stdin)["messages"]; print(m[1]["data"]["emailId"])')
"$ferry" send "email:command.$email_id" RecordEmailOpened '{"timestamp":"2022-06-06T08:29:30Z"}'
"$ferry" send subscription:command.paid RecordPayment '{}'

echo "# waiting $delay ms for the follow-ups"
sleep $(( delay / 1000 + 2 ))
for who in opened ignored paid; do
  echo "# subscription.$who"
  "$ferry" read "subscription.$who"
done
