#!/usr/bin/env bash
# The article's registration flow, driven with `ferry send` against a running host
# (FERRY_DATA / FERRY_SERVICES point at its folders; FERRY names the binary).
# Services: user, email, user-aggregator.
set -euo pipefail
ferry=${FERRY:-ferry}
user=${1:-ann-$$}

echo "# is the username free? (the users view, as the page would ask)"
"$ferry" view users-by-username ann 2>/dev/null || echo "ann is free"

echo "# RegisterUser: a command, not a request; the answer comes as events. The password is"
echo "# sealed: stored encrypted, its key destroyed once the command is handled"
"$ferry" send "user:command.$user" RegisterUser --sealed password \
  '{"username":"ann","email":"ann@example.com","password":"correct horse battery staple","firstName":"Ann","lastName":"Lee"}'
sleep 1
echo "# the same username again, for another user id: rejected by the handler"
"$ferry" send "user:command.$user-twin" RegisterUser --sealed password \
  '{"username":"ann","email":"twin@example.com","password":"x","firstName":"Ann","lastName":"Twin"}'
"$ferry" send "user:command.$user" ChangeName '{"firstName":"Annie","lastName":"Lee"}'
sleep 1

echo "# user.$user"
"$ferry" read "user.$user"
echo "# user.$user-twin"
"$ferry" read "user.$user-twin"
echo "# the NotifyUser command waiting for the socket-notification service"
"$ferry" read "socket-notification:command.$user"
echo "# the users view"
"$ferry" view users
