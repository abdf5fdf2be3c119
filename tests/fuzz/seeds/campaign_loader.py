#!/usr/bin/env python3
# Writes the campaign_loader seeds: parts joined by 0xFF (see fuzz_targets/campaign_loader.rs).
# Run from tests/fuzz/seeds/campaign_loader/: python3 ../campaign_loader.py
import os
SEP = b"\xff"
ORDER = ["toml", "subject", "text", "html", "a", "b", "en", "fr", "csv", "en2"]
def seed(name, **parts):
    out = SEP.join(parts.get(k, "").encode() for k in ORDER)
    open(name, "wb").write(out.rstrip(SEP))

EN = """greeting = Hello { $name }!
-brand = Acme
    .gender = neuter
intro = { -brand } changes its terms.
    .title = New terms at { -brand }
emails = { $count ->
    [one] one email
   *[other] { $count } emails
}
plan = Your plan: { $plan }
"""
FR = """greeting = Bonjour { $name } !
-brand = { $case ->
   *[nom] Acmé
    [gen] d'Acmé
}
intro = Les conditions { -brand(case: "gen") } changent.
emails = { NUMBER($count) ->
    [one] un courriel
   *[other] { $count } courriels
}
"""
TEXT = """{{t "greeting" name=r.name}}

{{t "intro"}}
{{t "emails" count=3}}
{{#if r.plan}}{{t "plan" plan=r.plan}}{{/if}}
{{> a}}
"""
HTML = """<html><head><style>p { color: red }</style></head><body>
<p>{{t "greeting" name=r.name}}</p>
<p>{{{r.bio}}}</p>
<ul>{{#each r}}<li>{{@key}}: {{this}}</li>{{/each}}</ul>
{{> a}}
</body></html>
"""
seed("example", subject='{{t "intro.title"}}', text=TEXT, html=HTML,
     a="-- \n{{campaign.id}} {{locale}}\n", en=EN, fr=FR)

seed("recursive_partials", subject="Hi", text="{{> a}}", a="a{{> b}}", b="b{{#if r.name}}{{> a}}{{/if}}", en="x = y\n")
seed("self_partial", subject="Hi", html="{{#> a}}fallback{{/a}}", a="{{> a}}{{> @partial-block}}", en="x = y\n")
seed("missing_partial", subject="Hi", text="{{> nosuch}}{{> (lookup r \"name\")}}", en="x = y\n")

seed("deep_blocks", subject="Hi", text="{{#if r.name}}" * 33 + "x" + "{{/if}}" * 33, en="x = y\n")
seed("deep_parens", subject="Hi", text='{{t "x" a=' + "(concat " * 40 + "1" + ")" * 40 + "}}", en="x = y\n")
seed("deep_partial_blocks", subject="Hi", text="{{#> a}}" * 20 + "{{/a}}" * 20, a="{{> @partial-block}}{{> @partial-block}}", en="x = y\n")
seed("nested_each", subject="Hi", text="{{#each r}}{{#each ../r}}{{#each @root.r}}{{@key}}{{/each}}{{/each}}{{/each}}", en="x = y\n")

seed("triple_stash", subject="{{{r.name}}}", html="{{{r.bio}}} {{{r.name}}} {{& r.plan}} {{{this.r.bio}}} {{#with r}}{{{name}}}{{/with}} {{{lookup r \"plan\"}}}", en="x = y\n")
seed("triple_stash_allowed", subject="{{r.name}}", html="<p>{{{r.bio}}}</p>\n{{{t \"x\" name=r.name}}}", en="x = <b>{ $name }</b>\n")

seed("each_blocks", subject="{{#each r}}{{@index}}{{/each}}",
     text="{{#each r}}{{@key}}={{this}}\n{{else}}none{{/each}}{{#each campaign}}{{this}}{{/each}}{{#unless r.plan}}no plan{{/unless}}",
     en="x = y\n")

seed("fluent_selectors_terms", subject='{{t "intro.title"}}',
     text='{{t "emails" count=1}} {{t "emails" count=2}} {{t "emails" count="many"}} {{t "loop"}} {{t "greeting"}}',
     en=EN + "loop = { other }\nother = { loop }\n", fr=FR,
     en2="-brand = Duplicate\ngreeting = again\n")
seed("fluent_syntax_errors", subject="Hi", text="x", en="ok = fine\nbroken = { $\n  .attr\n-term\n", fr="= nothing\nx = { -nope(\n")

seed("huge_repeats", subject="Hi", html="{{> b}}" * 100, b="{{> a}}" * 100, a="0123456789" * 100, en="x = y\n")
seed("huge_fluent", subject="Hi", text='{{t "big"}}{{t "big"}}', en="-t = " + "abcdefghij" * 500 + "\nbig = " + "{ -t }" * 120 + "\n")
seed("deep_html", subject="Hi", html="<div>" * 1000 + "x" + "</div>" * 1000, en="x = y\n")

TOML = """[campaign]
id = "fuzz-small"
from = "Fuzz <news@example.com>"
template = "templates"
locales = "locales"
default_locale = "fr"
kind = "announcement"
list_id = "Fuzz <fuzz.example.com>"
inline_css = true

[recipients]
path = "recipients.csv"

[transport]
kind = "file"
outbox = "outbox"

[safety]
max_message_size = 1500
raw_html_columns = ["name"]
"""
seed("small_limit_toml", toml=TOML, subject="{{t \"greeting\" name=r.name}}",
     html="<style>p { color: red }</style><p>{{{r.name}}}</p>" + "<p>{{r.email}}</p>" * 40,
     en="greeting = Hello { $name }\n", fr="greeting = Bonjour { $name }\n",
     csv="email,name,locale\nann@example.com,Ann,fr-CA\nbob@example.com,Bob,\n")
seed("bad_toml", toml='[campaign]\nid = "no spaces allowed"\nfrom = "not an address"\ntemplate = "nowhere"\n\n[safety]\nmax_message_size = -1\n', subject="Hi", text="x", en="x = y\n")
seed("syntax_errors", subject="{{#if}}", text="{{#each r}}\n\n{{/if}}", html="{{> }}{{!-- ", a="{{#*inline \"x\"}}y{{/inline}}", en="x = y\n")
seed("subject_line_break", subject="{{r.name}}{{t \"nl\"}}", text="x", en="nl = a\n    b\n")
