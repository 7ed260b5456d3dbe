//! `deploy/` without a container engine, Kubernetes or Slurm: every file is a known kind and
//! parses (YAML with serde_yaml_ng, Dockerfiles and shell with the small readers below),
//! each platform's manifests have the structure the cluster needs, and every `medray`
//! invocation in them (YAML `command`/`args`, Dockerfile `RUN`/`CMD`/`ENTRYPOINT`, shell
//! text, the README's `sh` blocks) uses only subcommands and flags that `medray ... --help`
//! of this very build lists; every `MEDRAY_*` variable they set is one medray documents.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml_ng::Value;

const BIN: &str = env!("CARGO_BIN_EXE_medray");

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

// ---------------------------------------------------------------------------------------
// `--help` pages
// ---------------------------------------------------------------------------------------

/// What one `medray [path] --help` lists.
#[derive(Debug, Default, Clone)]
struct HelpPage {
    /// `--listen` / `-h` → number of values the flag takes.
    flags: BTreeMap<String, usize>,
    subcommands: BTreeSet<String>,
    text: String,
}

/// Reads clap's help: `Commands:` entries (indented 2) and option lines (indented at most
/// 6, starting with `-`: `-h, --help`, `--listen <LISTEN>`, `--size <SIZE> <SIZE> <SIZE>`).
fn parse_help(text: &str) -> HelpPage {
    let mut page = HelpPage {
        text: text.to_string(),
        ..HelpPage::default()
    };
    let mut in_commands = false;
    for line in text.lines() {
        if line.trim().is_empty() {
            in_commands = false;
            continue;
        }
        if !line.starts_with(' ') {
            in_commands = line.trim_end() == "Commands:";
            continue;
        }
        let body = line.trim_start();
        let indent = line.len() - body.len();
        if in_commands && indent <= 4 {
            if let Some(name) = body.split_whitespace().next() {
                page.subcommands.insert(name.to_string());
            }
        } else if indent <= 6 && body.starts_with('-') {
            // The names and value placeholders end where the description starts.
            let names = body.split("  ").next().unwrap_or(body);
            let words: Vec<&str> = names.split_whitespace().collect();
            for (i, word) in words.iter().enumerate() {
                let word = word.trim_end_matches(',');
                if !word.starts_with('-') {
                    continue;
                }
                let (name, inline) = match word.split_once('=') {
                    Some((n, _)) => (n, 1),
                    None => (word, 0),
                };
                let following = words[i + 1..]
                    .iter()
                    .take_while(|w| w.starts_with('<') || w.starts_with('['))
                    .count();
                page.flags.insert(name.to_string(), inline + following);
            }
        }
    }
    page
}

/// Help pages of the medray binary, read on demand (or given, in the checker's own tests).
struct Help {
    bin: Option<PathBuf>,
    pages: BTreeMap<Vec<String>, HelpPage>,
}

impl Help {
    fn of_binary(bin: &str) -> Self {
        Self {
            bin: Some(PathBuf::from(bin)),
            pages: BTreeMap::new(),
        }
    }

    fn page(&mut self, path: &[String]) -> Result<&HelpPage, String> {
        if !self.pages.contains_key(path) {
            let bin = self
                .bin
                .as_ref()
                .ok_or_else(|| format!("no help page for `medray {}`", path.join(" ")))?;
            let mut cmd = Command::new(bin);
            cmd.args(path).arg("--help");
            // The environment must not change what help shows (clap prints env values).
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("MEDRAY_") {
                    cmd.env_remove(k);
                }
            }
            let out = cmd
                .output()
                .map_err(|e| format!("running {}: {e}", bin.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "`medray {} --help` failed: {}",
                    path.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let page = parse_help(&String::from_utf8_lossy(&out.stdout));
            self.pages.insert(path.to_vec(), page);
        }
        Ok(&self.pages[path])
    }

    /// The help text of the top-level command and of every subcommand.
    fn all_text(&mut self) -> Result<String, String> {
        let mut text = self.page(&[])?.text.clone();
        let subs: Vec<String> = self.page(&[])?.subcommands.iter().cloned().collect();
        for sub in subs.into_iter().filter(|s| s != "help") {
            text.push_str(&self.page(&[sub])?.text);
        }
        Ok(text)
    }
}

// ---------------------------------------------------------------------------------------
// Finding `medray` invocations in shell text and in exec-form argument lists
// ---------------------------------------------------------------------------------------

/// One `medray ...` command line found in a file.
#[derive(Debug, Clone)]
struct Invocation {
    file: String,
    /// `argv[0]` is the medray program (`medray`, `/usr/local/bin/medray`).
    argv: Vec<String>,
    /// First words of the commands it is nested in (`srun`, `bash`), outermost first.
    via: Vec<String>,
}

/// Shell text split into simple commands (words, quotes removed), plus the texts nested in
/// it (command substitutions, quoted strings with spaces) to be read as shell in turn.
#[derive(Debug, Default)]
struct Lexed {
    commands: Vec<Vec<String>>,
    nested: Vec<Nested>,
}

/// Text inside a command that may hold more commands.
#[derive(Debug)]
struct Nested {
    text: String,
    /// Index of the command it belongs to in [`Lexed::commands`].
    command: usize,
    /// `$(...)` and backticks are code; a quoted string is code only as a shell's argument
    /// (`sh -c '...'`), otherwise it may be a message (`echo "medray is ..."`).
    substitution: bool,
}

/// Reads up to the `close` that balances an already consumed opener; returns the inside.
fn read_balanced(
    chars: &mut std::iter::Peekable<std::str::Chars>,
    open: char,
    close: char,
) -> String {
    let mut depth = 1;
    let mut inner = String::new();
    let mut quote: Option<char> = None;
    for c in chars.by_ref() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == open => depth += 1,
            None if c == close => {
                depth -= 1;
                if depth == 0 {
                    return inner;
                }
            }
            None => {}
        }
        inner.push(c);
    }
    inner
}

/// A small POSIX-shell word splitter: enough for the scripts in deploy/ (no here-docs).
fn lex_shell(text: &str) -> Lexed {
    let mut out = Lexed::default();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars().peekable();

    fn end_word(words: &mut Vec<String>, word: &mut String, in_word: &mut bool) {
        if *in_word {
            words.push(std::mem::take(word));
            *in_word = false;
        }
    }
    fn end_command(out: &mut Lexed, words: &mut Vec<String>) {
        if !words.is_empty() {
            out.commands.push(std::mem::take(words));
        }
    }

    while let Some(c) = chars.next() {
        let here = out.commands.len();
        match c {
            '\\' => match chars.next() {
                Some('\n') | None => {}
                Some(n) => {
                    word.push(n);
                    in_word = true;
                }
            },
            '#' if !in_word => {
                while chars.peek().is_some_and(|&n| n != '\n') {
                    chars.next();
                }
            }
            '\'' => {
                let mut s = String::new();
                for n in chars.by_ref() {
                    if n == '\'' {
                        break;
                    }
                    s.push(n);
                }
                if s.contains(char::is_whitespace) {
                    out.nested.push(Nested {
                        text: s.clone(),
                        command: here,
                        substitution: false,
                    });
                }
                word.push_str(&s);
                in_word = true;
            }
            '"' => {
                let mut s = String::new();
                while let Some(n) = chars.next() {
                    match n {
                        '"' => break,
                        '\\' => {
                            if let Some(e) = chars.next() {
                                s.push(e);
                            }
                        }
                        '$' if chars.peek() == Some(&'(') => {
                            chars.next();
                            let inner = read_balanced(&mut chars, '(', ')');
                            s.push_str(&format!("$({inner})"));
                        }
                        _ => s.push(n),
                    }
                }
                if s.contains(char::is_whitespace) {
                    out.nested.push(Nested {
                        text: s.clone(),
                        command: here,
                        substitution: false,
                    });
                }
                word.push_str(&s);
                in_word = true;
            }
            '$' if chars.peek() == Some(&'(') => {
                chars.next();
                let inner = read_balanced(&mut chars, '(', ')');
                out.nested.push(Nested {
                    text: inner.clone(),
                    command: here,
                    substitution: true,
                });
                word.push_str(&format!("$({inner})"));
                in_word = true;
            }
            '$' if chars.peek() == Some(&'{') => {
                chars.next();
                let inner = read_balanced(&mut chars, '{', '}');
                word.push_str(&format!("${{{inner}}}"));
                in_word = true;
            }
            '`' => {
                let mut s = String::new();
                for n in chars.by_ref() {
                    if n == '`' {
                        break;
                    }
                    s.push(n);
                }
                out.nested.push(Nested {
                    text: s.clone(),
                    command: here,
                    substitution: true,
                });
                word.push_str(&format!("`{s}`"));
                in_word = true;
            }
            // `2>&1`, `>&2`: a redirection, not a background `&`.
            '&' if word.ends_with('>') || word.ends_with('<') => {
                word.push(c);
                in_word = true;
            }
            '\n' | ';' | '|' | '&' | '(' | ')' => {
                end_word(&mut words, &mut word, &mut in_word);
                end_command(&mut out, &mut words);
            }
            c if c.is_whitespace() => end_word(&mut words, &mut word, &mut in_word),
            _ => {
                word.push(c);
                in_word = true;
            }
        }
    }
    end_word(&mut words, &mut word, &mut in_word);
    end_command(&mut out, &mut words);
    out
}

fn is_medray(word: &str) -> bool {
    word == "medray" || word.ends_with("/medray")
}

/// The `medray ...` invocations of one simple command. `medray` counts when a medray
/// subcommand follows it (`srun ... medray worker`) or, in code, when it is the command
/// (after `exec`, `env`, `nohup`, `VAR=value`); `useradd ... medray` does not.
fn invocations_in_command(
    words: &[String],
    file: &str,
    via: &[String],
    root_subcommands: &BTreeSet<String>,
    code: bool,
) -> Vec<Invocation> {
    let mut start = 0;
    while start < words.len() {
        let w = &words[start];
        let assignment = w.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if assignment || matches!(w.as_str(), "exec" | "env" | "nohup") {
            start += 1;
        } else {
            break;
        }
    }
    let mut found = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if !is_medray(w) {
            continue;
        }
        let next_is_subcommand = words
            .get(i + 1)
            .is_some_and(|n| root_subcommands.contains(n));
        if (code && i == start) || next_is_subcommand {
            found.push(Invocation {
                file: file.to_string(),
                argv: words[i..].to_vec(),
                via: via.to_vec(),
            });
        }
    }
    found
}

fn is_shell(word: &str) -> bool {
    let base = word.rsplit('/').next().unwrap_or(word);
    matches!(base, "sh" | "bash" | "dash" | "zsh")
}

/// Every invocation in shell text, including inside `$(...)`, quotes and `sh -c '...'`.
/// `code`: whether the text is run (a script) or may be a message (a quoted string).
fn shell_invocations(
    text: &str,
    file: &str,
    via: &[String],
    root_subcommands: &BTreeSet<String>,
    code: bool,
) -> Vec<Invocation> {
    let lexed = lex_shell(text);
    let mut found = Vec::new();
    for words in &lexed.commands {
        found.extend(invocations_in_command(
            words,
            file,
            via,
            root_subcommands,
            code,
        ));
    }
    for nested in &lexed.nested {
        let enclosing = lexed.commands.get(nested.command);
        let mut via = via.to_vec();
        if let Some(first) = enclosing.and_then(|c| c.first()) {
            via.push(first.clone());
        }
        let code = code
            && (nested.substitution || enclosing.is_some_and(|c| c.iter().any(|w| is_shell(w))));
        found.extend(shell_invocations(
            &nested.text,
            file,
            &via,
            root_subcommands,
            code,
        ));
    }
    found
}

/// Invocations in an exec-form argument list (`["medray", "head", ...]`, `["sh", "-c", "..."]`).
fn exec_invocations(
    argv: &[String],
    file: &str,
    root_subcommands: &BTreeSet<String>,
) -> Vec<Invocation> {
    let mut found = invocations_in_command(argv, file, &[], root_subcommands, true);
    let via: Vec<String> = argv.first().cloned().into_iter().collect();
    let code = argv.iter().any(|w| is_shell(w));
    for arg in argv.iter().filter(|a| a.contains(char::is_whitespace)) {
        found.extend(shell_invocations(arg, file, &via, root_subcommands, code));
    }
    found
}

/// A parsed invocation: the subcommand path and each flag with its values.
#[derive(Debug, Clone, Default)]
struct Parsed {
    path: Vec<String>,
    flags: Vec<(String, Vec<String>)>,
}

impl Parsed {
    fn value(&self, flag: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(f, _)| f == flag)
            .and_then(|(_, v)| v.first())
            .map(String::as_str)
    }
}

fn is_redirection(word: &str) -> bool {
    let rest = word.trim_start_matches(|c: char| c.is_ascii_digit());
    rest.starts_with('>') || rest.starts_with('<')
}

/// Checks an invocation against the help pages; every unknown subcommand or flag is an error.
fn check_invocation(inv: &Invocation, help: &mut Help) -> Result<Parsed, Vec<String>> {
    let mut parsed = Parsed::default();
    let mut errors = Vec::new();
    let argv = &inv.argv;
    let mut i = 1;
    while i < argv.len() {
        let word = &argv[i];
        i += 1;
        if word == "--" {
            break;
        }
        if is_redirection(word) {
            // `>` alone: its target is the next word.
            if word
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start_matches(['<', '>', '&'])
                .is_empty()
            {
                i += 1;
            }
            continue;
        }
        let page = match help.page(&parsed.path) {
            Ok(p) => p,
            Err(e) => {
                errors.push(e);
                break;
            }
        };
        let command = format!("medray {}", parsed.path.join(" "));
        let command = command.trim_end();
        if word.starts_with('-') && word.len() > 1 {
            let (name, inline) = match word.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (word.as_str(), None),
            };
            match page.flags.get(name) {
                None => errors.push(format!(
                    "{}: `{command}` has no flag {name} (in: {})",
                    inv.file,
                    argv.join(" ")
                )),
                Some(&n) => {
                    let values = match inline {
                        Some(v) => vec![v],
                        None => {
                            let v = argv[i..argv.len().min(i + n)].to_vec();
                            i += n;
                            v
                        }
                    };
                    parsed.flags.push((name.to_string(), values));
                }
            }
        } else if page.subcommands.contains(word) {
            parsed.path.push(word.clone());
        } else if parsed.path.is_empty() || !page.subcommands.is_empty() {
            // medray needs a subcommand here: a word that is none is a typo.
            errors.push(format!(
                "{}: `{command}` has no subcommand {word} (in: {})",
                inv.file,
                argv.join(" ")
            ));
        }
        // else: a positional argument of a leaf command
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(errors)
    }
}

// ---------------------------------------------------------------------------------------
// Reading the files
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Yaml,
    Dockerfile,
    DockerIgnore,
    Shell,
    Markdown,
}

fn kind_of(path: &Path) -> Option<Kind> {
    let name = path.file_name()?.to_str()?;
    if name.ends_with(".dockerignore") {
        Some(Kind::DockerIgnore)
    } else if name.starts_with("Dockerfile") {
        Some(Kind::Dockerfile)
    } else if name.ends_with(".yml") || name.ends_with(".yaml") {
        Some(Kind::Yaml)
    } else if name.ends_with(".sbatch") || name.ends_with(".sh") {
        Some(Kind::Shell)
    } else if name.ends_with(".md") {
        Some(Kind::Markdown)
    } else {
        None
    }
}

/// Every file under `dir`, sorted; dot-files (a local `deploy/.env`) are not manifests.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn rel(path: &Path) -> String {
    path.strip_prefix(deploy_dir())
        .map(|p| format!("deploy/{}", p.display()))
        .unwrap_or_else(|_| path.display().to_string())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every YAML document of a file (merge keys `<<:` applied; empty documents dropped).
fn yaml_docs(text: &str, file: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let mut value =
            Value::deserialize(doc).map_err(|e| format!("{file}: document {}: {e}", i + 1))?;
        value
            .apply_merge()
            .map_err(|e| format!("{file}: document {}: {e}", i + 1))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// One Dockerfile instruction (continuation lines joined, comments dropped).
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
    /// Index of the build stage (0 for the first `FROM`).
    stage: usize,
}

fn dockerfile_instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut stage = 0usize;
    let mut seen_from = false;
    let mut logical = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && logical.is_empty()) {
            continue;
        }
        if let Some(body) = line.trim_end().strip_suffix('\\') {
            logical.push_str(body);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let full = std::mem::take(&mut logical);
        let full = full.trim();
        if full.is_empty() {
            continue;
        }
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((full, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            if seen_from {
                stage += 1;
            }
            seen_from = true;
        }
        out.push(Instruction {
            keyword,
            args: args.trim().to_string(),
            stage,
        });
    }
    out
}

/// `["a", "b"]` (exec form) or `None` (shell form).
fn exec_form(args: &str) -> Option<Vec<String>> {
    args.trim_start()
        .starts_with('[')
        .then(|| serde_json::from_str::<Vec<String>>(args.trim()).ok())
        .flatten()
}

fn dockerfile_invocations(
    instructions: &[Instruction],
    file: &str,
    roots: &BTreeSet<String>,
) -> Vec<Invocation> {
    let mut found = Vec::new();
    let stages = instructions.last().map_or(0, |i| i.stage + 1);
    for stage in 0..stages {
        let mut entrypoint: Vec<String> = Vec::new();
        let mut cmd: Vec<String> = Vec::new();
        for ins in instructions.iter().filter(|i| i.stage == stage) {
            match ins.keyword.as_str() {
                "RUN" => match exec_form(&ins.args) {
                    Some(argv) => found.extend(exec_invocations(&argv, file, roots)),
                    None => {
                        // Drop RUN's own flags (--mount=..., --network=...).
                        let words: Vec<&str> = ins.args.split_whitespace().collect();
                        let skip = words.iter().take_while(|w| w.starts_with("--")).count();
                        found.extend(shell_invocations(
                            &words[skip..].join(" "),
                            file,
                            &[],
                            roots,
                            true,
                        ));
                    }
                },
                "ENTRYPOINT" | "CMD" => {
                    let argv = exec_form(&ins.args)
                        .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into(), ins.args.clone()]);
                    if ins.keyword == "ENTRYPOINT" {
                        entrypoint = argv;
                        cmd.clear();
                    } else {
                        cmd = argv;
                    }
                }
                "HEALTHCHECK" => {
                    if let Some((_, rest)) = ins.args.split_once("CMD") {
                        match exec_form(rest) {
                            Some(argv) => found.extend(exec_invocations(&argv, file, roots)),
                            None => found.extend(shell_invocations(rest, file, &[], roots, true)),
                        }
                    }
                }
                _ => {}
            }
        }
        // What the container runs: ENTRYPOINT followed by CMD.
        let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if !argv.is_empty() {
            found.extend(exec_invocations(&argv, file, roots));
        }
    }
    found
}

/// Strings of a YAML value: a sequence's scalars, or a string's shell words.
fn yaml_words(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(items) => items.iter().map(scalar_string).collect(),
        Value::String(s) => lex_shell(s).commands.into_iter().flatten().collect(),
        _ => Vec::new(),
    }
}

fn scalar_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => serde_yaml_ng::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

/// Invocations in YAML: every mapping with `entrypoint`/`command`/`args` (compose services,
/// Kubernetes containers) runs their concatenation; healthcheck `test` lists too.
fn yaml_invocations(v: &Value, file: &str, roots: &BTreeSet<String>) -> Vec<Invocation> {
    let mut found = Vec::new();
    match v {
        Value::Mapping(m) => {
            let mut argv = Vec::new();
            for key in ["entrypoint", "command", "args"] {
                if let Some(part) = m.get(key) {
                    argv.extend(yaml_words(part));
                }
            }
            if !argv.is_empty() {
                found.extend(exec_invocations(&argv, file, roots));
            }
            if let Some(test) = m.get("test") {
                let mut words = yaml_words(test);
                if words
                    .first()
                    .is_some_and(|w| w == "CMD" || w == "CMD-SHELL")
                {
                    words.remove(0);
                }
                found.extend(exec_invocations(&words, file, roots));
            }
            for (k, child) in m {
                let handled = k
                    .as_str()
                    .is_some_and(|k| ["entrypoint", "command", "args", "test"].contains(&k));
                if !handled {
                    found.extend(yaml_invocations(child, file, roots));
                }
            }
        }
        Value::Sequence(items) => {
            for item in items {
                found.extend(yaml_invocations(item, file, roots));
            }
        }
        _ => {}
    }
    found
}

/// Names of the environment variables a YAML file sets: Kubernetes `env: [{name}]`, compose
/// `environment` (mapping or `K=V` list), Secret and ConfigMap keys.
fn yaml_env_names(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Mapping(m) => {
            if let Some(Value::Sequence(env)) = m.get("env") {
                for e in env {
                    if let Some(name) = e.get("name").and_then(Value::as_str) {
                        out.insert(name.to_string());
                    }
                }
            }
            match m.get("environment") {
                Some(Value::Mapping(env)) => {
                    out.extend(env.keys().filter_map(Value::as_str).map(str::to_string));
                }
                Some(Value::Sequence(env)) => {
                    for e in env.iter().filter_map(Value::as_str) {
                        out.insert(e.split('=').next().unwrap_or(e).to_string());
                    }
                }
                _ => {}
            }
            let kind = m.get("kind").and_then(Value::as_str);
            if matches!(kind, Some("Secret" | "ConfigMap")) {
                for key in ["data", "stringData"] {
                    if let Some(Value::Mapping(d)) = m.get(key) {
                        out.extend(d.keys().filter_map(Value::as_str).map(str::to_string));
                    }
                }
            }
            for child in m.values() {
                yaml_env_names(child, out);
            }
        }
        Value::Sequence(items) => {
            for item in items {
                yaml_env_names(item, out);
            }
        }
        _ => {}
    }
}

/// `ENV K=V ...` keys of a Dockerfile and `export K=...` names of a shell script.
fn dockerfile_env_names(instructions: &[Instruction], out: &mut BTreeSet<String>) {
    for ins in instructions.iter().filter(|i| i.keyword == "ENV") {
        let words: Vec<String> = lex_shell(&ins.args)
            .commands
            .into_iter()
            .flatten()
            .collect();
        if words.first().is_some_and(|w| !w.contains('=')) {
            out.insert(words[0].clone()); // legacy `ENV KEY value`
        } else {
            out.extend(
                words
                    .iter()
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, _)| k.to_string()),
            );
        }
    }
}

fn shell_exported_names(text: &str, out: &mut BTreeSet<String>) {
    for words in lex_shell(text).commands {
        if words.first().is_some_and(|w| w == "export") {
            out.extend(
                words[1..]
                    .iter()
                    .map(|w| w.split('=').next().unwrap_or(w).to_string()),
            );
        }
    }
}

/// The fenced ```sh blocks of a Markdown file.
fn markdown_shell_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim_start();
        match &mut current {
            Some(block) if t.starts_with("```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None if matches!(t, "```sh" | "```bash" | "```shell" | "```console") => {
                current = Some(String::new());
            }
            None => {}
        }
    }
    blocks
}

/// Whether `name` occurs in `text` as a whole variable name.
fn mentions_var(text: &str, name: &str) -> bool {
    text.match_indices(name).any(|(i, _)| {
        !text[i + name.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

// ---------------------------------------------------------------------------------------
// The whole of deploy/
// ---------------------------------------------------------------------------------------

/// Everything read from deploy/.
struct Deploy {
    files: Vec<(String, Kind)>,
    yaml: BTreeMap<String, Vec<Value>>,
    dockerfiles: BTreeMap<String, Vec<Instruction>>,
    texts: BTreeMap<String, String>,
    invocations: Vec<Invocation>,
    env_names: BTreeMap<String, BTreeSet<String>>,
}

fn load(help: &mut Help) -> Deploy {
    let roots = help.page(&[]).expect("medray --help").subcommands.clone();
    let mut d = Deploy {
        files: Vec::new(),
        yaml: BTreeMap::new(),
        dockerfiles: BTreeMap::new(),
        texts: BTreeMap::new(),
        invocations: Vec::new(),
        env_names: BTreeMap::new(),
    };
    let mut problems = Vec::new();
    for path in walk(&deploy_dir()) {
        let file = rel(&path);
        let Some(kind) = kind_of(&path) else {
            problems.push(format!(
                "{file}: not a kind of file this test knows; teach cli/tests/deploy_manifests.rs to check it"
            ));
            continue;
        };
        let text = read(&path);
        let mut env = BTreeSet::new();
        match kind {
            Kind::Yaml => match yaml_docs(&text, &file) {
                Ok(docs) => {
                    for doc in &docs {
                        d.invocations.extend(yaml_invocations(doc, &file, &roots));
                        yaml_env_names(doc, &mut env);
                    }
                    d.yaml.insert(file.clone(), docs);
                }
                Err(e) => problems.push(e),
            },
            Kind::Dockerfile => {
                let instructions = dockerfile_instructions(&text);
                d.invocations
                    .extend(dockerfile_invocations(&instructions, &file, &roots));
                dockerfile_env_names(&instructions, &mut env);
                d.dockerfiles.insert(file.clone(), instructions);
            }
            Kind::Shell => {
                d.invocations
                    .extend(shell_invocations(&text, &file, &[], &roots, true));
                shell_exported_names(&text, &mut env);
            }
            Kind::Markdown => {
                for block in markdown_shell_blocks(&text) {
                    d.invocations
                        .extend(shell_invocations(&block, &file, &[], &roots, true));
                }
            }
            Kind::DockerIgnore => {}
        }
        d.env_names.insert(file.clone(), env);
        d.texts.insert(file.clone(), text);
        d.files.push((file, kind));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    d
}

/// The parsed invocations of one file, each checked (panics listing every error).
fn parsed_in(d: &Deploy, help: &mut Help, file: &str) -> Vec<(Invocation, Parsed)> {
    let mut out = Vec::new();
    for inv in d.invocations.iter().filter(|i| i.file == file) {
        match check_invocation(inv, help) {
            Ok(p) => out.push((inv.clone(), p)),
            Err(e) => panic!("{}", e.join("\n")),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn every_medray_flag_and_variable_in_deploy_exists() {
    let mut help = Help::of_binary(BIN);
    let d = load(&mut help);
    for expected in [
        "deploy/README.md",
        "deploy/docker/Dockerfile",
        "deploy/docker/Dockerfile.cuda",
        "deploy/docker-compose.yml",
        "deploy/k8s/kustomization.yaml",
        "deploy/slurm/medray.sbatch",
    ] {
        assert!(d.texts.contains_key(expected), "{expected} is missing");
    }

    let mut errors = Vec::new();
    let mut per_file: BTreeMap<&str, usize> = BTreeMap::new();
    for inv in &d.invocations {
        *per_file.entry(inv.file.as_str()).or_default() += 1;
        match check_invocation(inv, &mut help) {
            Ok(parsed) => {
                if parsed.flags.iter().any(|(f, _)| f == "--token") {
                    errors.push(format!(
                        "{}: `{}` passes --token on the command line (visible in ps): use MEDRAY_TOKEN",
                        inv.file,
                        inv.argv.join(" ")
                    ));
                }
            }
            Err(e) => errors.extend(e),
        }
    }
    // Each manifest must actually be seen to run medray, or this test checks nothing there.
    for (file, kind) in &d.files {
        if matches!(kind, Kind::Yaml | Kind::Dockerfile | Kind::Shell)
            && !file.ends_with("kustomization.yaml")
            && !file.ends_with("namespace.yaml")
            && !file.ends_with("secret.yaml")
        {
            assert!(
                per_file.get(file.as_str()).copied().unwrap_or(0) > 0,
                "{file}: no `medray` invocation found (the extraction missed it?)"
            );
        }
    }

    let documented = help.all_text().expect("help pages");
    for (file, names) in &d.env_names {
        for name in names.iter().filter(|n| n.starts_with("MEDRAY_")) {
            if !mentions_var(&documented, name) {
                errors.push(format!(
                    "{file}: sets {name}, which no `medray ... --help` mentions"
                ));
            }
        }
    }
    for (file, kind) in &d.files {
        let mut code_lines = d.texts[file]
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'));
        if *kind != Kind::Markdown && code_lines.any(|l| l.contains("target-cpu=native")) {
            errors.push(format!(
                "{file}: uses target-cpu=native (images must be portable)"
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(
        d.invocations.len() >= 8,
        "too few invocations found: {:?}",
        d.invocations
    );
}

fn final_stage(instructions: &[Instruction]) -> Vec<&Instruction> {
    let last = instructions.last().map_or(0, |i| i.stage);
    instructions.iter().filter(|i| i.stage == last).collect()
}

fn first_arg<'a>(instructions: &[&'a Instruction], keyword: &str) -> Option<&'a str> {
    instructions
        .iter()
        .find(|i| i.keyword == keyword)
        .map(|i| i.args.as_str())
}

#[test]
fn dockerfiles_are_multi_stage_portable_and_unprivileged() {
    let mut help = Help::of_binary(BIN);
    let d = load(&mut help);
    for (file, instructions) in &d.dockerfiles {
        let froms: Vec<&Instruction> = instructions
            .iter()
            .filter(|i| i.keyword == "FROM")
            .collect();
        assert!(froms.len() >= 2, "{file}: not multi-stage");
        let builder = froms[0].args.split_whitespace().last().unwrap_or_default();
        let runs: Vec<&str> = instructions
            .iter()
            .filter(|i| i.keyword == "RUN" && i.stage == 0)
            .map(|i| i.args.as_str())
            .collect();
        assert!(
            runs.iter()
                .any(|r| r.contains("cargo build --release --locked -p medray-cli")),
            "{file}: the builder stage must run `cargo build --release --locked -p medray-cli`"
        );
        let last = final_stage(instructions);
        assert!(
            last.iter()
                .any(|i| i.keyword == "COPY" && i.args.contains(&format!("--from={builder}"))),
            "{file}: the runtime stage copies nothing from {builder}"
        );
        let user = last
            .iter()
            .rev()
            .find(|i| i.keyword == "USER")
            .map(|i| i.args.as_str());
        assert!(
            user.is_some_and(|u| !u.starts_with("root") && !u.starts_with("0")),
            "{file}: the runtime must run as a non-root USER, has {user:?}"
        );
        let volume = first_arg(&last, "VOLUME").unwrap_or_default();
        assert!(volume.contains("/data"), "{file}: no VOLUME /data");
        let exposed: BTreeSet<&str> = last
            .iter()
            .filter(|i| i.keyword == "EXPOSE")
            .flat_map(|i| i.args.split_whitespace())
            .collect();
        for port in ["50051", "8265", "50052"] {
            assert!(exposed.contains(port), "{file}: does not EXPOSE {port}");
        }
        let entrypoint = first_arg(&last, "ENTRYPOINT").and_then(exec_form);
        assert_eq!(
            entrypoint,
            Some(vec!["medray".to_string()]),
            "{file}: ENTRYPOINT"
        );

        if file.ends_with(".cuda") {
            let args: BTreeSet<&str> = instructions
                .iter()
                .filter(|i| i.keyword == "ARG")
                .map(|i| i.args.split('=').next().unwrap_or_default())
                .collect();
            assert!(
                args.contains("CUDA_COMPUTE_CAP"),
                "{file}: no ARG CUDA_COMPUTE_CAP"
            );
            assert!(
                d.texts[file].contains("ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}"),
                "{file}: CUDA_COMPUTE_CAP must reach the build's environment"
            );
            // The features are a build arg: cuda by default, cudnn with the cuDNN images.
            assert!(
                d.texts[file].contains("ARG MEDRAY_FEATURES=cuda\n")
                    && runs
                        .iter()
                        .any(|r| r.contains("--features \"${MEDRAY_FEATURES}\"")),
                "{file}: the build must default to --features cuda through MEDRAY_FEATURES"
            );
            assert!(
                d.texts[file].contains("ARG IMAGE_FLAVOR=\n"),
                "{file}: the plain CUDA images must be the default (IMAGE_FLAVOR empty)"
            );
            assert!(
                runs.iter().any(|r| r.contains("rustup")),
                "{file}: no rustup"
            );
            let image = |i: &Instruction| {
                i.args
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            };
            let devel = image(froms[0]);
            let runtime = image(froms[froms.len() - 1]);
            assert!(
                devel.starts_with("nvidia/cuda:") && devel.contains("devel-ubuntu"),
                "{file}: builder {devel} is not an nvidia/cuda devel image"
            );
            assert_eq!(
                runtime,
                devel.replace("devel-ubuntu", "runtime-ubuntu"),
                "{file}: the runtime image must match the devel image"
            );
        } else {
            let runtime = froms[froms.len() - 1].args.as_str();
            assert!(
                runtime.starts_with("debian:") && runtime.contains("-slim"),
                "{file}: runtime {runtime} is not a slim Debian image"
            );
        }
    }
    assert_eq!(d.dockerfiles.len(), 2, "Dockerfile and Dockerfile.cuda");
}

/// Host and port of `http://host:port`.
fn host_port(address: &str) -> (String, String) {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, ""));
    (host.to_string(), port.trim_end_matches('/').to_string())
}

fn seconds(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::String(s)) => {
            let s = s.trim();
            if let Some(m) = s.strip_suffix('m') {
                m.parse::<u64>().map_or(0, |m| m * 60)
            } else {
                s.trim_end_matches('s').parse().unwrap_or(0)
            }
        }
        _ => 0,
    }
}

#[test]
fn compose_runs_a_head_and_workers_with_a_data_volume() {
    let mut help = Help::of_binary(BIN);
    let d = load(&mut help);
    let file = "deploy/docker-compose.yml";
    let doc = &d.yaml[file][0];
    let services = doc["services"].as_mapping().expect("services");
    let roots = help.page(&[]).expect("help").subcommands.clone();

    let mut heads = Vec::new();
    let mut workers = Vec::new();
    for (name, svc) in services {
        let name = name.as_str().expect("service name").to_string();
        let invs = yaml_invocations(svc, file, &roots);
        for inv in invs {
            let parsed = check_invocation(&inv, &mut help).expect("checked above");
            match parsed.path.first().map(String::as_str) {
                Some("head") => heads.push((name.clone(), svc.clone(), parsed)),
                Some("worker") => workers.push((name.clone(), svc.clone(), parsed)),
                _ => {}
            }
        }
    }
    assert_eq!(
        heads.len(),
        1,
        "{file}: exactly one service runs `medray head`"
    );
    assert!(
        !workers.is_empty(),
        "{file}: no service runs `medray worker`"
    );
    let (head_name, head, hp) = &heads[0];

    // The cluster node: announced under the service name, on a fixed port.
    assert_eq!(
        hp.value("--node-host"),
        Some(head_name.as_str()),
        "{file}: head --node-host"
    );
    let node_port = hp.value("--node-port").expect("head --node-port");
    assert_ne!(node_port, "0", "{file}: --node-port must be fixed");
    let http = hp.value("--http-listen").expect("head --http-listen");
    let grpc = hp.value("--listen").expect("head --listen");

    // Data on a named volume at the head's data dir.
    let data_dir = hp.value("--data-dir").unwrap_or("/data");
    let volumes = doc["volumes"].as_mapping().expect("top-level volumes");
    let mounts: Vec<String> = head["volumes"]
        .as_sequence()
        .expect("head volumes")
        .iter()
        .map(scalar_string)
        .collect();
    assert!(
        mounts.iter().any(|m| {
            let (src, dst) = m.split_once(':').unwrap_or(("", m));
            volumes.contains_key(src) && dst.starts_with(data_dir)
        }),
        "{file}: the head must mount a named volume at {data_dir}: {mounts:?}"
    );

    // Health check on /healthz of the head's HTTP port.
    let test: Vec<String> = yaml_words(&head["healthcheck"]["test"]);
    let (_, http_port) = host_port(http);
    assert!(
        test.iter()
            .any(|w| w.contains(&format!(":{http_port}/healthz"))),
        "{file}: the head's healthcheck must GET /healthz on {http_port}: {test:?}"
    );
    assert!(
        head["environment"].get("MEDRAY_TOKEN").is_some(),
        "{file}: head token"
    );

    let (_, grpc_port) = host_port(grpc);
    for (name, svc, wp) in &workers {
        let env = &svc["environment"];
        assert!(
            env.get("MEDRAY_WORKER_TOKEN").is_some(),
            "{file}: {name} has no MEDRAY_WORKER_TOKEN"
        );
        assert!(
            env.get("MEDRAY_TOKEN").is_none(),
            "{file}: {name} must not get the client token"
        );
        let address = wp
            .value("--address")
            .map(str::to_string)
            .or_else(|| env.get("MEDRAY_ADDRESS").map(scalar_string))
            .expect("worker address");
        assert_eq!(
            host_port(&address),
            (head_name.clone(), grpc_port.clone()),
            "{file}: {name} must reach the head's gRPC port"
        );
        let drain: u64 = wp
            .value("--drain-timeout-s")
            .map_or(60, |v| v.parse().expect("number"));
        assert!(
            seconds(svc.get("stop_grace_period")) > drain,
            "{file}: {name}: stop_grace_period must exceed --drain-timeout-s {drain}"
        );
    }
    assert!(
        workers
            .iter()
            .any(|(_, svc, _)| svc["deploy"].get("replicas").is_some())
            || workers.len() > 1,
        "{file}: N workers: deploy.replicas or several worker services"
    );
}

/// Containers of a pod template (Deployment, StatefulSet).
fn containers(workload: &Value) -> Vec<&Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
}

fn container_port(container: &Value, port: &Value) -> Option<u64> {
    if let Some(n) = port.as_u64() {
        return Some(n);
    }
    container["ports"]
        .as_sequence()?
        .iter()
        .find(|p| p["name"].as_str() == port.as_str())
        .and_then(|p| p["containerPort"].as_u64())
}

fn selects(service: &Value, workload: &Value) -> bool {
    let labels = &workload["spec"]["template"]["metadata"]["labels"];
    service["spec"]["selector"]
        .as_mapping()
        .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

#[test]
fn kubernetes_manifests_have_what_the_cluster_needs() {
    let mut help = Help::of_binary(BIN);
    let d = load(&mut help);
    let roots = help.page(&[]).expect("help").subcommands.clone();

    // The kustomization lists exactly the other manifests of k8s/.
    let kfile = "deploy/k8s/kustomization.yaml";
    let kust = &d.yaml[kfile][0];
    let listed: BTreeSet<String> = kust["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| format!("deploy/k8s/{}", scalar_string(r)))
        .collect();
    let present: BTreeSet<String> = d
        .yaml
        .keys()
        .filter(|f| f.starts_with("deploy/k8s/") && f.as_str() != kfile)
        .cloned()
        .collect();
    assert_eq!(listed, present, "{kfile}: resources");

    let mut by_kind: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for file in &present {
        for doc in &d.yaml[file] {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: a document without kind"));
            assert!(
                doc["metadata"]["name"].as_str().is_some(),
                "{file}: a {kind} without a name"
            );
            by_kind.entry(kind.to_string()).or_default().push(doc);
        }
    }
    for kind in [
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "StatefulSet",
        "Secret",
    ] {
        assert!(by_kind.contains_key(kind), "deploy/k8s: no {kind}");
    }
    let name = |v: &Value| {
        v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    let secret = by_kind["Secret"][0];
    let secret_name = name(secret);
    let secret_keys: BTreeSet<String> = ["data", "stringData"]
        .iter()
        .filter_map(|k| secret[*k].as_mapping())
        .flat_map(|m| m.keys().filter_map(Value::as_str).map(str::to_string))
        .collect();
    for key in ["MEDRAY_TOKEN", "MEDRAY_STAGE_KEY"] {
        assert!(
            secret_keys.contains(key),
            "Secret {secret_name} lacks {key}"
        );
    }
    let from_secret = |c: &Value, var: &str| {
        env_value(c, var).is_some_and(|e| {
            e["valueFrom"]["secretKeyRef"]["name"].as_str() == Some(secret_name.as_str())
                && e["valueFrom"]["secretKeyRef"]["key"].as_str() == Some(var)
        })
    };

    // The one container that runs `medray <sub>` in a workload.
    let run = |help: &mut Help, workload: &Value, sub: &str| -> (Value, Parsed) {
        for c in containers(workload) {
            for inv in yaml_invocations(c, "k8s", &roots) {
                let parsed = check_invocation(&inv, help).expect("checked above");
                if parsed.path.first().map(String::as_str) == Some(sub) {
                    return (c.clone(), parsed);
                }
            }
        }
        panic!("{} runs no `medray {sub}`", name(workload));
    };

    // Head: Deployment + probes + PVC + Service.
    let head = by_kind["Deployment"][0];
    let (hc, hp) = run(&mut help, head, "head");
    let live = &hc["livenessProbe"]["httpGet"];
    let ready = &hc["readinessProbe"]["httpGet"];
    assert_eq!(
        live["path"].as_str(),
        Some("/healthz"),
        "head liveness probe"
    );
    assert_eq!(
        ready["path"].as_str(),
        Some("/readyz"),
        "head readiness probe"
    );
    let (_, http_port) = host_port(hp.value("--http-listen").expect("head --http-listen"));
    let http_port: u64 = http_port.parse().expect("http port");
    for probe in [live, ready] {
        assert_eq!(
            container_port(&hc, &probe["port"]),
            Some(http_port),
            "probe port"
        );
    }
    assert!(
        from_secret(&hc, "MEDRAY_TOKEN"),
        "head: MEDRAY_TOKEN from Secret {secret_name}"
    );
    assert!(
        from_secret(&hc, "MEDRAY_STAGE_KEY"),
        "head: MEDRAY_STAGE_KEY from Secret {secret_name}"
    );

    let data_dir = hp.value("--data-dir").unwrap_or("/data");
    let pvcs: BTreeSet<String> = by_kind["PersistentVolumeClaim"]
        .iter()
        .map(|p| name(p))
        .collect();
    let volumes = head["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .expect("head volumes");
    let data_volume = volumes
        .iter()
        .find(|v| {
            v["persistentVolumeClaim"]["claimName"]
                .as_str()
                .is_some_and(|c| pvcs.contains(c))
        })
        .expect("the head mounts a PersistentVolumeClaim");
    assert!(
        hc["volumeMounts"]
            .as_sequence()
            .expect("mounts")
            .iter()
            .any(|m| {
                m["name"] == data_volume["name"] && m["mountPath"].as_str() == Some(data_dir)
            }),
        "the claim must be mounted at --data-dir {data_dir}"
    );

    let services = &by_kind["Service"];
    let head_svc = services
        .iter()
        .find(|s| selects(s, head))
        .expect("a Service selects the head");
    let svc_ports: BTreeSet<u64> = head_svc["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    let (_, grpc_port) = host_port(hp.value("--listen").expect("head --listen"));
    let node_port = hp.value("--node-port").expect("head --node-port (fixed)");
    for port in [grpc_port.as_str(), node_port, &http_port.to_string()] {
        let port: u64 = port.parse().expect("port number");
        assert!(
            svc_ports.contains(&port),
            "Service {} lacks port {port}",
            name(head_svc)
        );
    }
    assert_eq!(
        hp.value("--node-host"),
        Some(name(head_svc).as_str()),
        "the head must announce its cluster node under its Service name"
    );
    assert_eq!(
        head_svc["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true),
        "workers register through the Service before the head is ready"
    );

    // Workers: StatefulSet with a GPU each.
    let workers = by_kind["StatefulSet"][0];
    let (wc, wp) = run(&mut help, workers, "worker");
    assert_eq!(
        wp.value("--device"),
        Some("cuda:0"),
        "workers: --device cuda:0"
    );
    let gpus = |section: &str| {
        wc["resources"][section]
            .get("nvidia.com/gpu")
            .map(scalar_string)
    };
    assert_eq!(
        gpus("limits").as_deref(),
        Some("1"),
        "workers: limits nvidia.com/gpu: 1"
    );
    assert!(
        from_secret(&wc, "MEDRAY_WORKER_TOKEN"),
        "workers: MEDRAY_WORKER_TOKEN from Secret {secret_name}"
    );
    assert!(
        !from_secret(&wc, "MEDRAY_TOKEN"),
        "workers must not get the client token"
    );
    assert!(
        env_value(&wc, "MEDRAY_STAGE_KEY").is_none(),
        "workers need no stage key"
    );
    let address = wp
        .value("--address")
        .map(str::to_string)
        .or_else(|| env_value(&wc, "MEDRAY_ADDRESS").map(|e| scalar_string(&e["value"])))
        .expect("worker address");
    assert_eq!(
        host_port(&address),
        (name(head_svc), grpc_port),
        "workers reach the head Service"
    );
    let drain: u64 = wp
        .value("--drain-timeout-s")
        .map_or(60, |v| v.parse().expect("number"));
    let grace = workers["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    assert!(
        grace > drain,
        "workers: terminationGracePeriodSeconds {grace} <= --drain-timeout-s {drain}"
    );
    let governing = workers["spec"]["serviceName"]
        .as_str()
        .expect("serviceName");
    assert!(
        services.iter().any(|s| name(s) == governing),
        "StatefulSet serviceName {governing} names no Service"
    );
}

#[test]
fn slurm_script_starts_the_head_then_a_worker_per_gpu_and_drains() {
    let mut help = Help::of_binary(BIN);
    let d = load(&mut help);
    let file = "deploy/slurm/medray.sbatch";
    let text = &d.texts[file];
    assert!(text.starts_with("#!/bin/bash"), "{file}: bash shebang");
    let directives: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("#SBATCH "))
        .collect();
    assert!(
        directives
            .iter()
            .any(|l| l.contains("--gpus-per-node") || l.contains("--gres=gpu")),
        "{file}: asks for no GPUs"
    );
    assert!(
        directives.iter().any(|l| l.starts_with("--signal=B:TERM@")),
        "{file}: needs --signal=B:TERM@<s> to drain before the time limit"
    );
    let parsed = parsed_in(&d, &mut help, file);
    let head = parsed
        .iter()
        .find(|(_, p)| p.path == ["head"])
        .expect("medray head");
    assert!(head.1.value("--node-host").is_some() && head.1.value("--node-port").is_some());
    let worker = parsed
        .iter()
        .find(|(_, p)| p.path == ["worker"])
        .expect("medray worker");
    assert!(
        worker.0.via.iter().any(|v| v == "srun"),
        "workers must start through srun: {:?}",
        worker.0.via
    );
    assert!(
        worker.1.value("--device").is_some(),
        "{file}: worker --device"
    );

    // A token made per job, exported (never a flag), and a trap that stops workers first.
    let commands = lex_shell(text).commands;
    assert!(
        commands
            .iter()
            .any(|c| c.first().is_some_and(|w| w.starts_with("MEDRAY_TOKEN=$(")))
            && text.contains("/dev/urandom"),
        "{file}: generate the token per job"
    );
    let traps: Vec<&Vec<String>> = commands
        .iter()
        .filter(|c| c.first().is_some_and(|w| w == "trap"))
        .collect();
    assert!(
        traps.iter().any(|t| t.iter().any(|w| w == "TERM")),
        "{file}: no TERM trap"
    );
    let term_workers = text
        .find("kill -TERM \"$WORKERS_PID\"")
        .expect("TERM to the worker step");
    let term_head = text
        .find("kill -TERM \"$HEAD_PID\"")
        .expect("TERM to the head");
    assert!(
        term_workers < term_head,
        "{file}: workers drain before the head stops"
    );
}

// ---------------------------------------------------------------------------------------
// The checker itself: it must reject what does not exist
// ---------------------------------------------------------------------------------------

const FAKE_ROOT: &str = "Usage: medray [OPTIONS] <COMMAND>

Commands:
  head    Run the head
  worker  Run a worker
  job     Jobs
  help    Print this message

Options:
      --device <DEVICE>  Run on this device [env: MEDRAY_DEVICE=] [default: cpu]
  -h, --help             Print help
";

const FAKE_WORKER: &str = "Usage: medray worker [OPTIONS] --token <TOKEN>

Options:
      --address <ADDRESS>
          Head address [env: MEDRAY_ADDRESS=]
      --token <TOKEN>
          Cluster token [env: MEDRAY_TOKEN]
      --drain-timeout-s <DRAIN_TIMEOUT_S>
          Seconds [default: 60]
  -h, --help
          Print help
";

fn fake_help() -> Help {
    let mut pages = BTreeMap::new();
    pages.insert(Vec::new(), parse_help(FAKE_ROOT));
    pages.insert(vec!["worker".to_string()], parse_help(FAKE_WORKER));
    Help { bin: None, pages }
}

fn check_shell(text: &str) -> Result<Vec<Parsed>, Vec<String>> {
    let mut help = fake_help();
    let roots = help.page(&[]).expect("root").subcommands.clone();
    let invs = shell_invocations(text, "t", &[], &roots, true);
    assert!(!invs.is_empty(), "no invocation found in {text:?}");
    invs.iter()
        .map(|i| check_invocation(i, &mut help))
        .collect()
}

#[test]
fn checker_reads_clap_help() {
    let page = parse_help(FAKE_WORKER);
    assert_eq!(page.flags.get("--address"), Some(&1));
    assert_eq!(page.flags.get("-h"), Some(&0));
    assert_eq!(page.flags.get("--help"), Some(&0));
    assert!(!page.flags.contains_key("--seconds"));
    let root = parse_help(FAKE_ROOT);
    assert_eq!(
        root.subcommands
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["head", "help", "job", "worker"]
    );
    // The real binary: every flag the deploy files rely on is seen by the parser.
    let mut help = Help::of_binary(BIN);
    let head = help.page(&["head".into()]).expect("head --help");
    for flag in [
        "--listen",
        "--node-host",
        "--node-port",
        "--http-listen",
        "--tls-cert",
        "--device",
    ] {
        assert_eq!(head.flags.get(flag), Some(&1), "{flag}");
    }
}

#[test]
fn checker_rejects_unknown_flags_and_subcommands() {
    // Accepted: flags with values, globals before the subcommand, redirections, env prefixes.
    let ok = check_shell(
        "RUST_LOG=info exec medray --device cpu worker --address http://h:1 --drain-timeout-s=5 >log 2>&1 &",
    )
    .expect("valid");
    assert_eq!(ok[0].path, ["worker"]);
    assert_eq!(ok[0].value("--drain-timeout-s"), Some("5"));
    // A value that looks like a subcommand is a value.
    check_shell("medray worker --address worker").expect("value");

    // Rejected, wherever the invocation hides.
    for text in [
        "medray worker --bogus-flag 1",
        "medray worker --address http://h:1 --drain-timeout 5",
        "srun -n 2 bash -c 'exec medray worker --cache-dirr /tmp'",
        "x=$(medray worker --nope)",
        "medray wrker --address x",
        "medray --devices cpu worker",
        "sh -c 'medray --address x worker'",
    ] {
        let errors = check_shell(text).expect_err(text);
        assert!(!errors.is_empty(), "{text}");
    }
    let errors = check_shell("medray worker --bogus-flag 1").expect_err("bogus");
    assert!(errors[0].contains("has no flag --bogus-flag"), "{errors:?}");

    // Not an invocation: medray as an argument.
    let roots = fake_help().page(&[]).expect("root").subcommands.clone();
    for text in [
        "useradd --gid medray --home-dir /data medray",
        "echo \"medray is not on PATH\" >&2",
    ] {
        assert!(
            shell_invocations(text, "t", &[], &roots, true).is_empty(),
            "{text}"
        );
    }

    // YAML (exec form and sh -c), Dockerfile ENTRYPOINT + CMD.
    let yaml = "command: [\"medray\"]\nargs: [\"worker\", \"--bogus\", \"x\"]\n";
    let doc = &yaml_docs(yaml, "t").expect("yaml")[0];
    let mut help = fake_help();
    let invs = yaml_invocations(doc, "t", &roots);
    assert_eq!(invs.len(), 1);
    assert!(check_invocation(&invs[0], &mut help).is_err());
    let yaml = "entrypoint: [\"/bin/sh\", \"-c\"]\ncommand: [\"exec medray worker --bogus\"]\n";
    let invs = yaml_invocations(&yaml_docs(yaml, "t").expect("yaml")[0], "t", &roots);
    assert!(check_invocation(&invs[0], &mut help).is_err());
    let dockerfile =
        "FROM x AS a\nFROM y\nENTRYPOINT [\"medray\"]\nCMD [\"worker\", \\\n  \"--bogus\"]\n";
    let invs = dockerfile_invocations(&dockerfile_instructions(dockerfile), "t", &roots);
    assert_eq!(invs.len(), 1);
    assert_eq!(invs[0].argv, ["medray", "worker", "--bogus"]);
    assert!(check_invocation(&invs[0], &mut help).is_err());

    // Variables: a name medray does not document is caught.
    let mut names = BTreeSet::new();
    yaml_env_names(
        &yaml_docs("env:\n  - name: MEDRAY_TOKN\n    value: x\n", "t").expect("yaml")[0],
        &mut names,
    );
    assert!(names.contains("MEDRAY_TOKN"));
    let documented = help
        .all_text()
        .unwrap_or_else(|_| FAKE_ROOT.to_string() + FAKE_WORKER);
    assert!(!mentions_var(&documented, "MEDRAY_TOKN"));
    assert!(mentions_var(&documented, "MEDRAY_TOKEN"));
}
