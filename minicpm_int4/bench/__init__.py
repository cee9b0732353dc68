"""The measuring side: kernel microbenchmarks (`minicpm-int4 bench`), end-to-end profiles
(`minicpm-int4 profile`), and the JSON / Markdown / PNG writers both share."""
