subject = Modification de nos conditions d’utilisation
greeting = Bonjour { $name },
greeting-anonymous = Bonjour,
body = Nous mettons à jour nos conditions d’utilisation le 1er décembre. Rien ne change dans votre façon de vous connecter, et vous n’avez rien à faire.
plan-line = Votre formule actuelle : { $plan }.
footer = Vous recevez ce message parce que vous avez un compte chez Example. Il s’agit d’une annonce de service, envoyée une seule fois.
