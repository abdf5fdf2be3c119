subject = Änderungen unserer Nutzungsbedingungen
greeting = Hallo { $name },
greeting-anonymous = Hallo,
body = Wir aktualisieren unsere Nutzungsbedingungen am 1. Dezember. An der Anmeldung ändert sich nichts, und Sie müssen nichts tun.
plan-line = Ihr aktueller Tarif: { $plan }.
# `footer` is deliberately missing here: German recipients see the English footer (fallback to the default locale).
