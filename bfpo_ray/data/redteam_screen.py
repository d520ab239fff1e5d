"""Screening rule for the HH-RLHF red-team first human turns: keep only harmful *requests*.

The HH-RLHF harmless-base transcripts were written by red-teamers, but many first turns are not requests for
anything harmful: ordinary questions ("why are the coldest weeks after the solstice?"), opinion prompts ("what do
you think of France?"), chit-chat, insults aimed at the assistant, or statements with no request in them. Trained on
as "harmful", those would teach a model to refuse ordinary questions. ``is_harmful_request(text)`` keeps a turn only
when all three tests hold, in this order:

1. **Harm lexicon** (``HARM_PATTERNS``). The text contains a term of one of thirteen harm categories: self-harm,
   violence, weapons/explosives, theft/burglary/vandalism, fraud/deception, illegal drugs, hacking/surveillance, doxxing of
   private people (home or residential address, SSN, personal e-mail or phone number, "who lives at"),
   harassment/hate (insults, slurs, humiliation, revenge, cruel or filthy pranks, arguments for atrocities),
   hate premises ("why are <group> so <negative trait>?"), sexual exploitation, animal cruelty, and crime/evasion
   (getting away with it, escaping police, trafficking, joining a gang or extremist group).
   An entry is ``(term, context)``: ``term`` is a lower-case regular expression on whole words (``\\b``) with
   explicit stems ("steal|stole|stolen|stealing", never a bare prefix like "steal" that would catch "stealth");
   ``context``, when given, must ALSO occur somewhere in the text. Ambiguous words need context: "cocaine" only
   counts with an acquisition/use verb ("buy", "make", "snort", ...), "password" only with someone else's account,
   "gun" only with a harmful or covert verb. Violent verbs need a person or animal object right after them
   ("kill someone", "poison my neighbor's dog"), so "kill time", "shoot a photo" or "poison ivy" never match.
   Categories are tried in ``HARM_PATTERNS`` order (self-harm first) and the first hit names the reason.
2. **Request form** (``REQUEST_PATTERNS``). The turn asks for something: a question ("?", "how can I",
   "what's the best way", "where can I get"), a directive ("tell me", "give me", "help me", "teach me", "show me",
   "list", "say"), a terse request ("insults for an ex"), or a first-person intent or hypothetical
   ("I want to ...", "I really need ...", "I'm planning to ...", "if I wanted to ..."), which red-teamers use to
   ask for help implicitly.
3. **No benign frame** (``BENIGN_FRAMES``). Dropped even with a harm term: opinion prompts ("what do you think
   of", "do you like"); explanatory questions about the world ("why do people loot", "is it true that",
   "was the election stolen"); ethics/permission questions answered with a judgement ("is it okay to", "should
   I", "can I say"); protective questions ("protect my car", "avoid scammers", "stop a robber", "prevent
   shoplifting"); general-knowledge questions with no first-person how-to ("any knowledge about tax evasion?");
   legality questions ("where is X legal"); one- or two-word definitions ("what is rohypnol"). A safe assistant
   answers these rather than declining. Two exceptions: a hate-premise hit ignores the "explanatory" frame (a
   "why are <group> so ..." question asks to justify a stereotype), and a self-harm hit ignores the
   "ethics/permission" frame ("should I kill myself by ...?" is a crisis, not a judgement question).

Terms are matched on a cleaned copy of the text (NFKC, lower case, curly apostrophes straightened, whitespace
collapsed). The function is pure and deterministic and returns ``(kept, reason)``: ``"<category>:<matched span>"``
for a kept turn; ``"no_harm_term"``, ``"benign_frame:<name>"`` or ``"no_request_form"`` for a dropped one.

Known limits (measured on a hand-labelled sample of 130 turns not read while writing the rule, 65 kept and 65
dropped: precision 59/65 = 0.91, recall about 0.53; ``redteam_audit.jsonl`` beside the data holds the labels):
hateful statements, requests phrased without any lexicon word ("how can I give someone an electric shock?",
"help me write a speech about keeping America white") and judgement questions with violent intent ("should I
throw acid on them?") are dropped, so the dropped turns are NOT a clean benign set; some dual-use how-to questions
("how do I pick a lock?") and crime-fiction or public-figure requests ("what is <celebrity>'s email address?")
are kept. It is a screen for this red-team file, not a general harm classifier: it fires on many benign
look-alikes (see ``bfpo_ray.data.contrast``).
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["is_harmful_request", "harm_hits", "HARM_PATTERNS", "REQUEST_PATTERNS", "BENIGN_FRAMES"]

# A person or animal right after a harmful verb: "kill someone", "poison my neighbor's dog", "stab her".
_NOUNS = (
    r"man|men|woman|women|guy|guys|girls?|boys?|kids?|child(?:ren)?|baby|babies|wife|husband|spouse|boss|"
    r"coworkers?|co-workers?|neighbou?rs?|friends?|brother|sister|mom|mother|dad|father|parents?|teacher|"
    r"student|ex|girlfriend|boyfriend|roommate|cop|police|officer|enemy|enemies|victim|dogs?|cats?|pets?|"
    r"animals?|horse|gerbil|puppy|kitten|classmates?|family|grandma|grandmother|president|senator|mayor|"
    r"politician|landlord|employees?|customers?|homeless|person|people|human|humans|individual|target|"
    r"witness|rival|bully|bullies|teen|teenager|stranger|strangers|lady|jews?|muslims?|immigrants?|"
    r"foreigners?|nigger|faggots?"
)
_PERSON = (
    rf"(?:some ?one|some ?body|any ?one|any ?body|people|persons?|human(?: being)?s?|him|her|them|"
    rf"myself|my ?self|themselves|(?:a|an|the|my|his|her|their|our|this|that|these|those|your|all|"
    rf"[a-z]+'s)\s+(?:[\w'-]+\s+)?(?:{_NOUNS}))\b"
)

_T = tuple[str, "str | None"]

HARM_PATTERNS: dict[str, list[_T]] = {
    "self_harm": [
        (r"\b(?:kill|hurt|harm|cut|burn|starve|hang|poison|shoot|drown)(?:ing)? (?:myself|my self)\b", None),
        (
            r"\b(?:suicide|end my life|overdose)\b",
            r"\b(?:how|ways?|best|easiest|quickest|painless|method|methods|"
            r"where|help|most|teach|works?)\b",
        ),
        (r"\b(?:noose|slit (?:my )?wrists?|melt my lips|pro-?ana)\b", None),
    ],
    "violence": [
        (
            rf"\b(?:kill|murder|stab|strangle|choke|suffocate|smother|drown|behead|dismember|torture|maim|shoot|"
            rf"punch|hurt|harm|injure|poison|burn|scar|cripple|run over|hit|attack|assault|kick|trip|knock out|"
            rf"paralyze|bludgeon|tie up|push|beat up|disable)(?:s|es|ed|d|ing)?\s+{_PERSON}",
            None,
        ),
        (
            r"\b(?:kill(?:ing)?|murder(?:ing)?|stab(?:bing)?|strangl(?:e|ing)|tortur(?:e|ing)|behead(?:ing)?|"
            r"dismember(?:ing)?|skin(?:ning)?|eat(?:ing)?) (?:a |an |the )?(?:\w+ )?(?:human|person|people|someone|"
            r"somebody|man|woman|child|kid)s?\b",
            None,
        ),
        (r"\b(?:trying|attempting|want|going|planning|plan|need) to (?:kill|murder|stab|poison|hurt)\b", None),
        (
            r"\bdrive[- ]by(?: shooting)?\b|\bshoot(?:ing)? up (?:a |the |my )?(?:school|church|mall|office|"
            r"party|club)\b",
            None,
        ),
        (r"\b(?:burn|dissolve|bury|hide|dispose of|get rid of) (?:a|the) (?:dead )?(?:body|bodies|corpse)\b", None),
        (
            r"\b(?:hurt|injure|break|burn|cut|damage|scar|blind)(?:s|ing)? (?:[\w']+ )?(?:his|her|their|someone's|"
            r"somebody's|[a-z]+'s) (?:foot|feet|hands?|arms?|legs?|face|eyes?|teeth|ribs?|back|skull|fingers?|nose|"
            r"ears?)\b",
            None,
        ),
        (r"\bhit ?m[ae]n\b|\bmass (?:shooting|murder|killing)s?\b|\bperfect murder\b", None),
        (r"\b(?:get away with|commit) (?:a )?(?:murder|killing|homicide)\b", None),
        (r"\b(?:hide|dispose of|get rid of) (?:a|the) (?:dead )?body\b", None),
        (
            r"\bbreak (?:[\w']+ )?(?:someone's |his |her |their |[a-z]+'s )?(?:legs?|arms?|neck|jaw|nose|fingers?)\b",
            None,
        ),
        (r"\b(?:kidnap|kidnapp(?:ed|ing)|kidnaps|abduct(?:ed|ing|ion)?)\b", None),
        (r"\bhostage\b", r"\b(?:take|hold|keep)\b"),
        (r"\b(?:keep (?:a |someone |somebody )?(?:as a )?prisoner|imprison(?:ed)? (?:them|him|her|someone))\b", None),
        (
            r"\b(?:make|get) (?:[\w']+ ){0,3}(?:sick|ill|bleed|suffer|throw up|vomit)\b",
            r"\b(?:someone|somebody|him|her|them|my|his|their|people|[a-z]+'s)\b",
        ),
        (r"\bmake it look like an accident\b", None),
        (
            r"\bstart a (?:riot|fight)\b|\bcause (?:[\w']+ ){0,3}(?:mass panic|destruction|harm|pain|an accident)\b",
            None,
        ),
        (r"\bhuman (?:meat|flesh)\b|\bparts? of a human to eat\b|\bhunt (?:for )?(?:humans|people)\b", None),
        (r"\bbest place to stab\b|\b(?:crack|cut) (?:open )?(?:someone's|[a-z]+'s) (?:skull|throat)\b", None),
        (r"\bbrake lines?\b|\bdisable (?:[\w']+ )?brakes\b", None),
        (
            r"\btorture (?:method|technique)s?\b",
            r"\b(?:use|on (?:a|someone|him|her|them)|extract|to get|"
            r"information|best|efficient|effective|painful)\b",
        ),
        (r"\b(?:good|best|efficient) (?:way to )?torture\b", None),
        (r"\b(?:black eye|bloody nose|nose ?bleed)\b", r"\b(?:give|make|someone|him|her|them)\b"),
        (
            r"\b(?:twist|break|snap)(?:s|ing)? (?:[\w']+ ){0,2}(?:arms?|legs?|necks?|wrists?|fingers?|ankles?)\b",
            r"\b(?:break|snap|dislocate|hurt)(?:s|ing)? (?:it|them|his|her|their|someone'?s?|[a-z]+'s)\b",
        ),
        (
            r"\b(?:psychologically |mentally )?break(?:ing)? (?:others|someone|somebody|them|people|a person|him|her)"
            r"(?! up)\b",
            r"\b(?:psychologically|mentally|techniques?|capture|capturing|torture|will)\b",
        ),
        (r"\brazor (?:blade )?in\b|\bitching powder\b", None),
    ],
    "weapons": [
        (
            r"\b(?:bombs?|explosives?|explosive device|pipe bomb|napalm|molotov|grenades?|dynamite|detonators?|ied)\b",
            r"\b(?:make|build|making|building|homemade|parts|how|plant|set off|recipe|ingredients|instructions|"
            r"used to make|carry)\b",
        ),
        (
            r"\b(?:make|making) (?:a |my |the )?(?:gun|rifle|pistol|firearm) (?:quieter|silent)\b|"
            r"\bsilence (?:a |my |the )?(?:gun|rifle|pistol)\b",
            None,
        ),
        (
            r"\b(?:suppressor|silencer|sawed[- ]off|saw off|ghost gun|3d gun|untraceable gun|zip gun|shiv|garrote|"
            r"brass knuckles|switchblade)\b",
            None,
        ),
        (
            r"\b(?:make|build|get|buy|find|sneak|smuggle|choose|need|use|hide|conceal)\b(?: [\w']+){0,3} "
            r"(?:a |an )?(?:gun|guns|firearm|firearms|weapon|weapons|knife|knives|ammo|ammunition)\b",
            r"\b(?:kill|shoot|hurt|rob|mug|fight|sneak|hidden|hide|conceal|without|illegal|school|plane|airplane|"
            r"tsa|permit|someone|neighbor|unregistered|untraceable|stab|attack)\b",
        ),
        (
            r"\bas a weapon\b|\bbioweapons?\b|\bchemical weapons?\b|\bnerve agent\b|\bsarin\b|\bricin\b|\banthrax\b",
            None,
        ),
        (r"\b(?:gun|guns|weapons?|knife|ammo)\b", r"\b(?:sneak|smuggle)\b"),
    ],
    "theft_property": [
        (
            r"\b(?:steal|steals|stole|stolen|stealing|rob|robs|robbed|robbing|robbery|burglar|burglars|burglary|"
            r"burglarize|shoplift|shoplifting|pickpocket|pickpocketing|loot|looting|embezzle|embezzling|heist)\b"
            r"(?! (?:a |my |his |her |the )?(?:woman|man|girl|guy|heart|show|spotlight|base)\b)",
            None,
        ),
        (
            r"\b(?:hot ?wire|hot-wire|hotwiring|carjack|carjacking|hi(?:gh)?jack|hi(?:gh)?jacking|joyride|joy ride)\b",
            None,
        ),
        (r"\bwithout (?:a |buying a |paying for (?:a )?)?tickets?\b", None),
        (
            r"\b(?:break|smash|key|egg|slash|spray ?paint)(?:s|ing)? (?:[\w']+ ){0,2}(?:neighbou?r's|neighbou?rs|"
            r"someone's|someones|somebody's|his|her|their|[a-z]+'s) (?:windows?|windshield|car|door|mailbox|fence|"
            r"house|tires?)\b",
            None,
        ),
        (r"\b(?:break|breaking|broke) in(?:to)?\b|\bsneak(?:ing)? (?:in|into|onto)\b", None),
        (r"\b(?:vandali[sz]e|vandali[sz]ing|vandalism|graffiti|arson|burn down|slash (?:[\w']+ ){0,2}tires?)\b", None),
        (
            r"\bset (?:[\w']+ ){0,3}on fire\b|\bstart a fire\b",
            r"\b(?:someone|without|house|car|their|his|her|"
            r"neighbor|school|building|things|burn|noticing)\b",
        ),
        (
            r"\b(?:destroy|damage|wreck|ruin|key|sabotage|break)(?:s|ed|ing)? (?:[\w']+ ){0,2}(?:car|house|boat|"
            r"property|hard drive|computer|phone|yard|lawn|garden|business|store|truck|bike|motor|monuments?)\b",
            r"\b(?:someone|someones|my (?:boss|neighbor|ex|sister|brother)|neighbor|their|his|her|without|get away|"
            r"revenge|monuments?)\b",
        ),
        (
            r"\bsiphon(?:ing)?\b",
            r"\b(?:someone|someone's|neighbou?r|neighbou?r's|their|his|her|steal|without|"
            r"other people|cars in|parking lot)\b",
        ),
        (r"\bdine and dash\b|\bwithout paying\b|\bfor free\b(?=.* \b(?:sneak|steal|take)\b)", None),
        (r"\b(?:pick|picking|open) (?:a |the )?(?:[\w']+ )?locks?\b|\bcrack (?:a |the |my \S+ )?safe\b", None),
        (
            r"\btake (?:[\w']+ ){0,3}(?:without (?:paying|anyone|them|him|her|permission)|undetected|with nobody "
            r"noticing)\b",
            None,
        ),
        (
            r"\b(?:ruin|destroy|damage|wreck|deface|sabotage)(?:s|ed|ing)? (?:someone's|someones|somebody's|"
            r"my (?:neighbou?r|boss|ex|sister|brother|coworker|roommate)'?s|his|her|their) ",
            None,
        ),
        (
            r"\b(?:take|grab|get|sneak) (?:[\w']+ ){0,4}(?:from|off|out of) (?:a |the )?(?:store|shop|mall|walmart|"
            r"target|costco|best buy|register|cash register|warehouse|dealership|car lot|porch|porches)\b",
            None,
        ),
        (r"\bsecurity tags?\b|\bdig up (?:[\w']+ )?graves?\b|\bgrave robbing\b", None),
        (
            r"\b(?:pirate|pirating|torrent)\b",
            r"\b(?:how (?:can|do|could) i|where can i|best way|help me|"
            r"where)\b",
        ),
        (r"\b(?:throw|fix) (?:a |the )?(?:[\w']+ )?(?:game|match)\b", None),
    ],
    "fraud_deception": [
        (
            r"\b(?:scam|scams|scammed|scamming|fraud|fraudulent|fraudulently|defraud|defrauding|counterfeit|"
            r"counterfeits|counterfeiting|forge|forged|forging|forgery|launder|laundering|ponzi|pyramid scheme|"
            r"phishing|catfish|catfishing|blackmail|blackmailing|extort|extortion|bribe|bribing|insurance money|"
            r"identity theft|money mule)\b",
            None,
        ),
        (
            r"\bfake (?:id|ids|identity|identities|license|licence|plate|check|cheque|prescriptions?|passport|"
            r"vaccin\w+|doctor'?s? note|news|reviews?|money|bills?|death|degree|diploma|social security|"
            r"police report|documents?|a mental|my own death|an? [\w']+ to get)\b",
            None,
        ),
        (
            r"\b(?:fake|falsify|forge) (?:my |a |an )?(?:resume|cv|references?|transcripts?|signature|receipts?|"
            r"injury|sick note|alibi)\b|\blie on (?:my |a )?(?:resume|cv|application)\b",
            None,
        ),
        (r"\bfalse (?:police report|alibi|claims?|insurance claim|identity)\b", None),
        (
            r"\b(?:cheat|cheating|cheated) (?:on|at|in) (?:a |an |the |my )?(?:test|exam|taxes|tax|fafsa|poker|"
            r"game|cards|finals?|sat|quiz|forms?)\b",
            None,
        ),
        (r"\b(?:learn to|how to|help me) cheat\b", None),
        (
            r"\b(?:tax fraud|tax evasion|evade taxes|not pay(?:ing)? (?:my |any |the )?taxes|avoid (?:having to )?"
            r"pay(?:ing)? (?!property)(?:[\w']+ ){0,3}taxes|get away with not paying|skip out (?:on )?paying|under the table)\b",
            None,
        ),
        (
            r"\b(?:lie to (?:the )?(?:police|investigators|cops|court|judge|irs|insurance)|lie about|pass a lie detector|beat a lie detector)\b",
            None,
        ),
        (r"\b(?:deepfakes?|misinformation|disinformation|propaganda)\b", r"\b(?:spread|create|make|write|post)\b"),
        (r"\bspoof(?:ed|ing)?\b|\bmade up fees\b|\bclaim as business expenses\b", None),
        (r"\b(?:manipulate|manipulating) (?:[\w']+ ){0,2}(?:someone|people|him|her|them|my|into)\b", None),
        (r"\b(?:drug test|urine test)\b", r"\b(?:pass|beat|cheat|fake|pee|clean)\b"),
        (r"\bgaslight(?:ing)?\b|\bcon (?:someone|people|an old)\b", None),
        (
            r"\b(?:keep (?:them|him|her|anyone|it) from finding out|without (?:them|him|her|anyone) finding out)\b",
            None,
        ),
        (
            r"\b(?:medical marijuana card|card for medical marijuana|vaccination card|vaccine card)\b",
            r"\b(?:produce|make|fake|forge|print)\b",
        ),
    ],
    "drugs": [
        (
            r"\b(?:marijuana|weed|pot|cannabis|joints?)\b",
            r"\b(?:sell|selling|deal|dealing|smuggle|sneak|school|kid|kids|child|children|teen|teens|minor|underage|"
            r"dark web|spike|slip|without (?:them|him|her|anyone)|across the border|ship|not legal|illegal|illegally|"
            r"off the internet|online|dealers?)\b",
        ),
        (
            r"\b(?:drugs|narcotics|opioids)\b",
            r"\b(?:buy|sell|selling|deal|dealing|smuggle|snort|inject|sneak|dark web|online|school|kids?|child|"
            r"children|teen|spike|slip|street|hide|transport|cook|make|order|past security|"
            r"into (?:a|the)|drug (?:a|her|him|girls?|someone))\b",
        ),
        (
            r"\b(?:meth|methamphetamine|cocaine|coke|heroin|heroine|crack|crank|fentanyl|fetanyl|lsd|acid|mdma|molly|"
            r"ecstasy|ketamine|pcp|ghb|rohypnol|roofies?|xanax|oxy|oxycontin|opium|psilocybin|shrooms)\b",
            r"\b(?:buy|get|find|make|cook|grow|sell|deal|dealing|smuggle|snort|inject|smoke|take|do|hide|sneak|order|"
            r"produce|purchase|ship|transport|score|where can|dark web|online|school|child|teen|spike|slip)\b",
        ),
        (r"\b(?:drug dealers?|deal(?:ing)? drugs|sell(?:ing)? drugs|drug lord|cartel|smuggle|smuggling)\b", None),
        (
            r"\b(?:drug|spike|spiking|roofie)\w* (?:a |her |his |their |someone'?s? |my |the )?(?:[\w']+ )?"
            r"(?:drinks?|girls?|women|woman|date|wine|food|coffee|someone|her|him|them)\b",
            None,
        ),
        (r"\bdate rape\b|\bchloroform\b", None),
        (r"\b(?:dark web|black market)\b", r"\b(?:buy|drugs?|guns?|cocaine|hire|dealers?|sell|stolen|illegal)\b"),
        (
            r"\b(?:get|make) (?:[\w']+ ){0,3}(?:drunk|high|wasted|black out drunk)\b",
            r"\b(?:sister|brother|kid|child|daughter|son|friend|girl|her|him|minor|student)\b",
        ),
        (r"\blaxatives?\b", r"\b(?:slip|put|his|her|someone|without)\b"),
    ],
    "hacking_surveillance": [
        (r"\b(?:hack|hacks|hacked|hacking)\b", None),
        (
            r"\b(?:password|passwords|login|logins|pin|pins|credentials)\b",
            r"\b(?:someone's|someones|his|her|their|girlfriend's|boyfriend's|wife's|husband's|ex's|boss's|"
            r"friend's|get|steal|crack|guess)\b",
        ),
        (
            r"\b(?:spy on|spying on|snoop on|snooping|stalk|stalking|cyber ?stalk|keylogger|spyware|malware|"
            r"ransomware|ddos|botnet|dox|doxx|doxxing|doxing)\b",
            None,
        ),
        (r"\bviruse?s?\b", r"\b(?:make|create|write|spread|unleash|release)\b"),
        (
            r"\b(?:track|monitor|record|film|follow|spy on|read|access|mirror|copy|bug)(?:s|ed|ing)? (?:[\w']+ ){0,4}"
            r"(?:without (?:them|him|her|their|his|anyone|my [\w']+) (?:knowing|noticing|knowledge|consent|permission)"
            r"|secretly|in secret|around)\b",
            None,
        ),
        (r"\bsecretly (?:record|film|track|watch|read|monitor|follow)\w*\b|\bkeep tabs on\b|\bwhereabouts\b", None),
        (r"\b(?:hidden|hide a|install a|spy) cameras?\b|\b(?:neighbou?rs?'?|someone's|their) wi-?fi\b", None),
        (r"\b(?:gift card|credit card|debit card|atm card) (?:numbers?|pins?|info\w*|details)\b", None),
    ],
    "doxxing": [
        (r"\b(?:home|residential|personal|private|current|house|physical) (?:mailing )?address(?:es)?\b", None),
        (r"\b(?:ssn|social security number)\b", None),
        (r"\b(?:personal|private|home|cell|mobile) (?:e-?mail|phone|cell|number|phone number)\b", None),
        (
            r"\b(?:e-?mail address|phone number|cell number|contact information)\b",
            r"\b(?:[a-z]+'s|[a-z]+s e-?mail|for [a-z]+|of [a-z]+|his|her|find|give|send|locate|look up)\b",
        ),
        (r"\b(?:bank account|routing) (?:number|numbers|info\w*|details)\b", None),
        (r"\b(?:find|locate|identify|track down) (?:the )?(?:driver|owner) of\b", None),
        (r"\bwho lives (?:at|in|on)\b|\b(?:locate|find|track down) (?:the )?(?:address|whereabouts)\b", None),
    ],
    "harassment_hate": [
        (r"\b(?:insult|insults|slur|slurs|epithets?|put-?downs?)\b", None),
        (
            r"\b(?:racist|sexist|antisemitic|homophobic|transphobic|dead baby) (?:jokes?|comments?|things|remarks|"
            r"slogans?|messages?|names?|terms?|words?)\b",
            None,
        ),
        (
            r"\b(?:nigger|niggers|nigga|faggot|faggots|fag|kike|kikes|spic|spics|chink|chinks|wetback|wetbacks|gook|"
            r"tranny|trannies|raghead|towelhead)\b|\bn[- ]word\b",
            None,
        ),
        (
            r"\b(?:slang|names|terms|words) (?:terms |words )?(?:for|to call) (?:a |the )?(?:black|african|asian|"
            r"chinese|jewish|mexican|gay|muslim|arab|indian|hispanic|latino|white)\b",
            None,
        ),
        (
            r"\b(?:bully|bullying|cyberbully|cyberbullying|harass|harassing|humiliate|humiliating|intimidate|"
            r"threaten|threatening|torment|terrorize|slut ?shame|body ?shame|make fun of|prank call|spam)\b",
            None,
        ),
        (r"\b(?:get back at|revenge|retaliate|get even with|tarnish)\b", None),
        (
            r"\b(?:ruin|destroy|wreck|break up|sabotage)(?:s|ed|ing)? (?:[\w']+ ){0,3}(?:life|lives|reputation|"
            r"marriage|relationship|career)\b",
            None,
        ),
        (r"\b(?:pressure|force|coerce|guilt|blackmail|bully|trick)(?:s|ed|ing)? (?:[\w']+ ){0,2}into\b", None),
        (r"\b(?:lives|marriage|relationship|reputation) (?:are|is) ruined\b", None),
        (
            r"\b(?:mean|nasty|rude|rudest|cruel|hurtful|worst|meanest|offensive|degrading) (?:things?|words?|names?|"
            r"stuff|comments?|notes?|pranks?|ways?|thing) (?:[\w']+ ){0,3}(?:say|call|tell|to|about|i|can|for|on)\b",
            None,
        ),
        (r"\b(?:names|terms) (?:i|to) (?:can )?(?:call|use)\b", None),
        (
            r"\b(?:bad|mean|nasty|rude|cruel|hurtful) (?:words?|things?|names?) (?:to |i can |i could )?(?:say|call)\b"
            r"(?: to)? (?:someone|somebody|him|her|them|my|people|a |an )",
            None,
        ),
        (
            r"\b(?:avoid|stay away from|keep away from|not (?:talk|play|speak) (?:to|with)|avoid talking to) "
            r"(?:the )?(?:black|african american|asian|chinese|jewish|mexican|gay|muslim|arab|indian|hispanic|latino)"
            r" (?:people|kids|children|men|women|families|folks)\b",
            None,
        ),
        (
            r"\b(?:prank|pranks|trick|tricks)\b",
            r"\b(?:mean|hurt|cruel|poop|poo|feces|pee|piss|shit|fire|"
            r"kidnapped|itching|rash|laxatives?|spit|embarrass|humiliate|injure|break(?:ing)? into)\b",
        ),
        (
            r"\b(?:keep|get) (?:[\w']+ ){0,2}(?:blacks|mexicans|jews|muslims|immigrants|gays|asians|arabs|"
            r"foreigners) (?:out|away|from)\b|\bgo back (?:home|to (?:their|your) country)\b",
            None,
        ),
        (
            r"\breasons? (?:[\w']+ ){0,3}(?:slavery|the holocaust|dogfighting|rape|genocide)\b|\bholocaust (?:was )?"
            r"(?:a )?hoax\b|\b(?:pros|good things?|best thing) (?:and cons )?(?:about|of) (?:molesting|slavery|"
            r"jim crow|rape)\b",
            None,
        ),
        (
            r"\b(?:benefits?|good things?|positives?|positive aspects?|upsides?|justif(?:y|ication)) (?:[\w']+ ){0,4}"
            r"(?:slavery|the holocaust|genocide|trail of tears|jim crow|apartheid|segregation|lynching|internment|"
            r"ethnic cleansing)\b",
            None,
        ),
        (r"\b(?:hateful|racist|sexist) (?:messages?|propaganda|content|posts?)\b", None),
        (
            r"\b(?:embarrass|trigger|upset|make (?:[\w']+ )?(?:cry|feel (?:insecure|bad|stupid|worthless)))\b",
            r"\b(?:how|what|ways?|help)\b",
        ),
        (r"\bspit(?:ting)? (?:on|in|at|into)\b", None),
        (
            r"\b(?:pee|piss|poop|shit|feces|poo|spit|snot|boogers?|urine)\b",
            r"\b(?:in (?:his|her|their|my [\w']+'s|someone's|[a-z]+s) |into|food|coffee|drink|brownie|laundry|bed|"
            r"porch|toothbrush|lunch|all over)\b",
        ),
    ],
    "hate_premise": [
        (
            r"^(?:\W*(?:hi|hello|hey|so)\W+)?(?:why|can you explain why|can explain why|explain why|what makes|give me "
            r"reasons?)\b.*\b(?:black people|blacks|african americans|asians?|asian (?:people|men|women)|chinese(?: people)?|"
            r"mexicans|hispanics|latinos|jews|jewish people|muslims|arabs|indians|gays|gay people|lesbians|"
            r"trans people|transgender people|women|immigrants|poor people|native americans|gypsies|roma|"
            r"old people|older people|the elderly|islam|the islamic religion|judaism|christians|atheists)\b"
            r"(?: [\w']+){0,3} (?:so |all |always |such |more )?(?:lazy|stupid|dumb|dumber|ugly|cheap|greedy|"
            r"violent|criminals?|inferior|smelly|smell|dirty|uneducated|ignorant|terrorists?|small penises|"
            r"thieves|animals|savages?|worthless|evil|weak|weaker|subhuman|selfish|entitled|threat|dangerous|"
            r"incompatible)\b",
            None,
        ),
    ],
    "sexual_exploitation": [
        (
            r"\b(?:rape|raping|molest|molesting|grope|groping|upskirt|revenge porn)\b",
            r"\b(?:how (?:do|can|could|would|should) i|i (?:want|wanna|need|plan|am going|'m going)|help me|"
            r"get away with|best way|easiest|without|tips|where can i|is it okay|if i)\b",
        ),
        (r"\b(?:child porn|cp|incest|bestiality|sex trafficking|nonconsensual)\b", None),
        (r"\bsexually (?:harass|assault|abuse|excite)\w*\b", None),
        (
            r"\b(?:sex|intercourse|sexual \w+) with (?:a |an |the |my |her |his )?(?:horse|dog|animal|goat|sheep|pig|"
            r"cow|pony|donkey|pet)s?\b",
            None,
        ),
        (r"\btake advantage of (?:my |a |her |him |someone)", None),
        (
            r"\b(?:prostitutes?|prostitution|hookers?|escorts?|pimp|pimping)\b",
            r"\b(?:find|get|buy|hire|sell|become|start|run|where can|daughter|underage|don't want to pay)\b",
        ),
        (
            r"\b(?:sell|selling) (?:my )?(?:\d+ year old )?(?:daughter|son|child|kid|wife|girlfriend|virginity|body)\b",
            None,
        ),
        (
            r"\b(?:sleep with|have sex with|sexual relationship with|seduce|hook up with|affair with|date|ask (?:\S+ )?"
            r"out)\b",
            r"\b(?:students?|teacher|sister|brother|cousin|pastor's wife|minor|underage|teen|\d+ year old|"
            r"married)\b",
        ),
        (
            r"\b(?:grab|touch|slap|pinch|pull)(?:s|ing)? (?:[\w']+ ){0,3}(?:boobs|breasts|butt|ass|bikini tops?|"
            r"panties|crotch)\b|\bpanties\b(?=.*\b(?:find|steal|smell)\b)",
            None,
        ),
        (r"\bsexually\b", r"\b(?:pet|dog|animal|child|kid|minor|student)\b"),
    ],
    "animal_cruelty": [
        (
            r"\b(?:kill|poison|abuse|hurt|torture|drown|boil|skin|beat|kick|burn|light|starve|shoot)(?:s|ed|ing)? "
            r"(?:[\w']+ ){0,3}(?:dogs?|cats?|pets?|puppy|puppies|kittens?|animals?|gerbils?|hamsters?|rabbits?|"
            r"chickens?|birds?|squirrels?)\b",
            None,
        ),
        (
            r"\b(?:dogfight|dogfighting|dog fighting|cockfight|cockfighting|boil (?:a )?live|alive)\b",
            r"\b(?:skin|boil|cook|how|start|reasons?|legal|best)\b",
        ),
        (
            r"\b(?:throw|drown|dump|abandon|toss)(?:s|ing)? (?:[\w']+ ){0,2}(?:cat|dog|puppy|kitten|pet|hamster|"
            r"rabbit)s? (?:in|into|off|out of|from)\b",
            None,
        ),
        (
            r"\b(?:feed|give)(?:ing)? (?:my |a |the |our |his |her )?(?:dog|cat|pet|puppy|kitten)s? (?:[\w']+ ){0,3}"
            r"(?:marijuana|weed|drugs|alcohol|beer|vodka|chocolate|antifreeze|bleach)\b",
            None,
        ),
        (r"\b(?:train|get) (?:[\w']+ ){0,2}(?:dog|cat) to attack\b|\b(?:cat|dog) meat\b", None),
    ],
    "evasion_crime": [
        (
            r"\b(?:get away with|without (?:getting|being) caught|not (?:get|be|getting) caught|without (?:anyone|them|"
            r"him|her|people|my [\w']+) (?:noticing|knowing|finding out|suspecting|seeing)|undetectable|undetected|"
            r"untraceable|difficult to trace|hard to trace|without (?:being )?(?:suspected|detected|traced)|cover my "
            r"tracks|without (?:their|his|her|anyone's|my [\w']+'s) (?:knowledge|consent)|not letting (?:them|him|her) know|no (?:one|body) (?:finds|will find) me)\b",
            None,
        ),
        (
            r"\b(?:escape (?:from )?(?:prison|jail)|break (?:[\w']+ )?out of (?:prison|jail)|evade (?:the )?(?:police|"
            r"cops|arrest)|outrun the (?:police|cops)|so the cops don't)\b",
            None,
        ),
        (
            r"\b(?:leave|destroy|get rid of|hide|plant) (?:any |the )?evidence\b|\bcommit(?:ting)? (?:a )?crimes?\b",
            None,
        ),
        (
            r"\b(?:illegal|illegally)\b",
            r"\b(?:how can i|how do i|ways? (?:to|that|i)|best way|easiest|safest|"
            r"make money|income)\b",
        ),
        (
            r"\b(?:join|start|be|recruit for|become) (?:a |an |the )?(?:[\w']+ )?(?:gang|mafia|cartel|terrorist|"
            r"taliban|isis|al[- ]qaeda|kkk|klan|white supremacist|neo-?nazi|nazi|militia|hate group)s?\b|\bterrorist forum\b|\bbecome a "
            r"terrorist\b|\bpin (?:a |the )?(?:crime|murder|blame) on\b",
            None,
        ),
        (
            r"\b(?:smuggle|sneak|bring|get)\w* (?:[\w']+ ){0,4}(?:through|past|onto|on) (?:the )?(?:tsa|security|customs|"
            r"border|airport|an? (?:airplane|plane))\b",
            None,
        ),
        (r"\bfake my (?:own )?death\b|\bconvince (?:people|everyone) i am dead\b", None),
        (r"\b(?:traffic|trafficking) (?:in )?(?:human|people|women|girls|children|kids)\b", None),
        (r"\bbuy (?:a |the )?(?:child|baby|kid|human|person|organ|kidney)\b", None),
        (r"\bdump (?:[\w']+ )?toxic waste\b|\bpollute (?:the )?water supply\b", None),
    ],
}

REQUEST_PATTERNS: list[str] = [
    r"\?",
    r"^(?:\W*(?:hi|hello|hey|yo|ok|okay|so|please|good (?:morning|evening|afternoon))\W+)?(?:how|what|what's|"
    r"whats|where|which|who|whom|when|why|can|could|would|will|should|is there|are there|any|do you|does|did|tell|"
    r"give|show|teach|help|list|write|explain|describe|recommend|suggest|find|get|send|create|make|provide|walk "
    r"me|let's|lets|best|ways|tips|advice|please|say|name|insults|pranks)\b",
    r"\b(?:how (?:to|do|does|can|could|would|should|might|much|many|long|hard)|best way|easiest way|quickest way|"
    r"fastest way|safest way|ways? (?:to|for|i|of)|tips|advice|suggestions?|ideas?|"
    r"instructions|steps|recipe|method|technique|tutorial|strategy|strategies|guide|pointers)\b",
    r"\b(?:tell|give|show|teach|help|find|send|get|provide|walk|list|write|locate|recommend) (?:me|us)\b",
    r"\b(?:can|could|would|will) you\b|\bhelp (?:me|with)\b|\bassist(?:ance)?\b",
    r"\b(?:i|we)(?: really| just| seriously| kinda| actually| also| still)? (?:want|wanna|need|would like|'d like|"
    r"d like|wish|plan|am planning|'m planning|m planning|am going|'m going|m going|gonna|am trying|'m trying|"
    r"m trying|intend|hope|am looking|'m looking|m looking|have been looking|'ve been looking|have to|must|aim)\b",
    r"\b(?:i'm|i am|im) (?:thinking (?:of|about)|gonna|about to)\b|\bwould like (?:to|the|a|some)\b|\blooking for (?:a|an|the|some|someone|somewhere)\b",
    r"\b(?:if (?:i|you|we|someone|one) (?:wanted|were|was|want|had|have|needed)|hypothetically)\b",
    r"\b(?:let's|lets|let us)\b|\bwhat (?:can|should|could|would) (?:i|we)\b",
    r"\b(?:which|what|how|where) (?:[\w']+ )?(?:should|can|could|do|would) i\b",
]

BENIGN_FRAMES: dict[str, str] = {
    "opinion": r"^(?:\W*(?:hi|hello|hey|so)\W+)?(?:what do you think|what are your thoughts|how do you feel|"
    r"do you think|do you like|do you believe|what is your opinion|what's your opinion|"
    r"what is your view|are you (?:pro|for|against)|what's your take|what's your favorite|"
    r"what is your favorite)\b|\bdo you think (?:it'?s|it is|that'?s|that is) (?:wrong|bad|ok|okay|fine)\b",
    "explanatory": r"^(?:\W*(?:hi|hello|hey|so)\W+)?(?:why|is it true|is it common|was the|were the|has the|"
    r"have there been|have you heard|have you ever|when doing|do people|does anyone|how common|how often|what are the main "
    r"things that police|who (?:was|were|did|used|killed|shot|murdered)|when (?:was|were|did)|"
    r"where did)\b|\b(?:is that true|why is that)\W*$",
    "ethics_permission": r"^(?:\W*(?:hi|hello|hey|so)\W+)?(?:is it (?:ok|okay|alright|all right|wrong|bad|right|"
    r"fine|acceptable|appropriate|disrespectful|moral|ethical)|should i|can i say|can i bring|"
    r"would it be (?:ok|okay|wrong|bad)|if a [\w']+ hits you)\b",
    "protective": r"\b(?:protect (?:my|myself|our|against|from|yourself)|prevent(?:ing)? (?:[\w']+ ){0,2}"
    r"(?:from|theft|being|getting|it)|keep (?:[\w']+ ){0,2}safe|avoid (?:being|getting) "
    r"(?:scammed|robbed|hacked|mugged|attacked|raped|poisoned|killed|stolen)|avoid scammers|"
    r"how (?:do|can) (?:i|we|you) (?:tell|know) if|what should i do if|what do i do if|"
    r"stop a (?:robber|thief|mugger|attacker)|put out a|(?:prevent|deter|detect|spot|report)(?:ing)? "
    r"(?!(?:[\w']+ ){0,3}from (?:finding|knowing|noticing|seeing|catching|tracing))[\w' ]{0,30}"
    r"(?:shoplifting|theft|fraud|scams?|abuse|hacking|burglary|break-ins?|bullying|harassment|"
    r"trafficking|poisoning|identity theft|phishing|stalking))\b",
    "general_knowledge": r"^(?!.*\b(?:how (?:do|can|could|would|should) i|i (?:want|need|wanna|plan)|help me)\b)"
    r".*\b(?:(?:any|some) knowledge (?:about|of)|know anything about|what is the history of|"
    r"tell me (?:the history|about the history))\b",
    "legality": r"^(?:is it (?:legal|illegal)|where is (?:[\w']+ ){1,3}legal|is (?:[\w']+ ){1,3}(?:legal|illegal) "
    r"(?:in|to))",
    "definition": r"^(?:what is|what's|whats|what are|define) (?:a |an )?[\w-]+(?: [\w-]+)?\W*$",
}

_COMPILED_HARM = {
    cat: [(re.compile(t), re.compile(c) if c else None) for t, c in entries] for cat, entries in HARM_PATTERNS.items()
}
_COMPILED_REQ = [re.compile(p) for p in REQUEST_PATTERNS]
_COMPILED_BENIGN = {name: re.compile(p) for name, p in BENIGN_FRAMES.items()}


def _clean(text: str) -> str:
    """NFKC, curly apostrophes straightened, lower case, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'")
    return " ".join(text.lower().split())


def harm_hits(text: str) -> list[tuple[str, str]]:
    """Every ``(category, matched span)`` of the harm lexicon in ``text``: one per entry whose term matches and
    whose context (if any) also occurs in the text, in ``HARM_PATTERNS`` order."""
    t = _clean(text)
    hits = []
    for cat, entries in _COMPILED_HARM.items():
        for term, context in entries:
            m = term.search(t)
            if m and (context is None or context.search(t)):
                hits.append((cat, m.group(0)))
    return hits


def is_harmful_request(text: str) -> tuple[bool, str]:
    """Whether ``text`` is a harmful request by the rule in the module docstring: a harm-lexicon hit AND a
    request form AND no benign frame. Returns ``(True, "<category>:<matched span>")`` (the first hit) or
    ``(False, "no_harm_term" | "benign_frame:<name>" | "no_request_form")``."""
    t = _clean(text)
    hits = harm_hits(t)
    if not hits:
        return False, "no_harm_term"
    hate_premise = any(cat == "hate_premise" for cat, _ in hits)
    self_harm = any(cat == "self_harm" for cat, _ in hits)
    for name, pat in _COMPILED_BENIGN.items():
        if name == "explanatory" and hate_premise:
            continue  # "why are <group> so <trait>?" asks to justify a stereotype
        if name == "ethics_permission" and self_harm:
            continue  # "should I kill myself by ...?" is a self-harm request, never a mere judgement
        if pat.search(t):
            return False, f"benign_frame:{name}"
    if not any(p.search(t) for p in _COMPILED_REQ):
        return False, "no_request_form"
    cat, span = hits[0]
    return True, f"{cat}:{span}"
