# Canadian French overrides only what differs; every other id falls back to `fr`, then `en`.
greeting = Allô { $name },
greeting-anonymous = Allô,
plan-line = Votre forfait actuel : { $plan }.
