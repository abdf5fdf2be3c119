subject = Changes to our terms of service
greeting = Hello { $name },
greeting-anonymous = Hello,
body = We are updating our terms of service on 1 December. Nothing changes in how you sign in, and there is nothing you need to do.
plan-line = Your current plan: { $plan }.
footer = You receive this message because you have an account with Example. This is a service announcement, sent once.
