// A persistent JavaScript REPL that speaks newline-delimited JSON on stdin/stdout (protocol 1).
//
// The JavaScript twin of repl_server.py: same messages, same fields, same semantics (full text:
// REPL_PROTOCOL.md beside this file). Standalone, no npm dependency; runs under Bun (preferred)
// or Node.js >= 20 inside a sandbox as `bun repl_server.js` / `node repl_server.js`, or with its
// source given to `-e` (the local backend without bwrap, like `python -c` for repl_server.py).
//
// User code runs in one `node:vm` context that lives as long as the process:
//
// - The context is created with `codeGeneration: {strings: false, wasm: false}` (no `eval`,
//   `Function(...)` or WebAssembly compilation inside it) and `microtaskMode: "afterEvaluate"`
//   (its own microtask queue, drained inside each timed `runInContext` call).
// - Nothing of the host realm is put into it: no `process`, `require`, `Bun`, `fetch`, timers or
//   `import()` (no dynamic-import callback is registered). Data goes in as strings parsed by the
//   context's own `JSON.parse`; the scaffold (`console`, `llm_query`, `search`, ...) is code evaluated
//   inside the context. Host functions reach the scaffold once, as one closure variable that user
//   code cannot name, and they take and return primitives only and never throw into it.
//   `ShadowRealm` is removed (under Bun it would open a realm with the host's `process`).
//   This is hardening, not the security boundary: the sandbox process is (no network, own
//   filesystem view, empty environment, resource limits, unprivileged user).
//
// Persistence and top-level await. Each cell is compiled as
//
//     (async () => { with (this) { <cell> } })()
//
// after a light lexical rewrite of the cell's top level (outside strings, comments, templates,
// regular expressions and brackets): `let`/`const` become `var`, `class C {...}` becomes
// `var C = class C {...};`, and the names these and `function` declarations introduce are
// collected. Those names are created on the context's global object (as `undefined` when new)
// before the cell runs, so inside `with (this)` every top-level assignment and read of them goes
// to the global object: variables, functions and classes survive to the next cell, closures see
// the shared globals, re-declaring a `const` in a later cell is allowed, and `await` works at
// the top level. Declarations inside blocks and functions stay local, as in any JavaScript.
//
// Timeouts: synchronous code (and every continuation after an `await`, since microtasks run
// inside timed `runInContext` calls) is interrupted at `timeout_s` by the vm `timeout` option;
// code waiting on `llm_query` past `timeout_s` is abandoned by a wall-clock timer. Both report
// `timed_out` and keep the session. The host kills the process when neither works.
//
// Limits (the host's, repeated here): a request over MAX_LINE_BYTES is refused in the code; a
// final answer or a variable's text is cut to MAX_FINAL_CHARS.
//
// This script stays whole: it is copied into sandboxes (or passed to `-e`) as one standalone
// file, so it cannot import siblings.

"use strict";

const vm = require("node:vm");
const fs = require("node:fs");

const PROTOCOL_VERSION = 1;
const DEFAULT_MAX_OUTPUT_CHARS = 100000;
const MAX_LINE_BYTES = 16 * 1024 * 1024; // the host's limit on one line: a longer request is refused here
const MAX_FINAL_CHARS = 1000000; // a final answer or a variable's text is cut to this
const SCAFFOLD_NAME = "__memcity__";
const HELPER_TIMEOUT_MS = 30000;
const FINISH_MIN_MS = 500;
// `import(...)`: its rejection would carry an error of the host realm, so cells using it are
// refused before they run. Keywords cannot contain escapes, and with code generation from
// strings disabled a cell's own text is the only place it can appear.
const DYNAMIC_IMPORT = /(^|[^.\w$])import\s*(\(|\/\*|\/\/)/;

// -- the scaffold, evaluated inside the context ----------------------------------------------

const SCAFFOLD = String.raw`(function (bridge) {
  "use strict";
  const G = globalThis;
  const O = Object, A = Array, S = String, J = JSON, R = Reflect;
  const keys = O.keys, own = O.getOwnPropertyNames, define = O.defineProperty;
  const getProto = O.getPrototypeOf, isArray = A.isArray, freeze = O.freeze;
  const stringify = J.stringify, parse = J.parse, apply = R.apply;
  const then = Promise.prototype.then, push = A.prototype.push, join = A.prototype.join;
  const PromiseCtor = Promise, ErrorCtor = Error, MapCtor = Map, SetCtor = Set;
  const mapEntries = Map.prototype.entries, setValues = Set.prototype.values;
  const dateISO = Date.prototype.toISOString, regexpToString = RegExp.prototype.toString;
  const IDENT = /^[A-Za-z_$][\w$]*$/;
  const pending = new MapCtor();
  let nextKey = 0;

  function send(kind, a, b, c) {
    return bridge(kind, a, b, c);
  }

  function typeName(value) {
    if (value === null) return "null";
    const t = typeof value;
    if (t === "function") return /^class[\s{]/.test(safeSource(value)) ? "class" : "function";
    if (t !== "object") return t;
    try {
      const proto = getProto(value);
      const ctor = proto && proto.constructor;
      return ctor && typeof ctor.name === "string" && ctor.name ? ctor.name : "Object";
    } catch (e) {
      return "object";
    }
  }

  function safeSource(fn) {
    try {
      return S(apply(Function.prototype.toString, fn, []));
    } catch (e) {
      return "";
    }
  }

  function quote(text) {
    return "'" + text.replace(/\\/g, "\\\\").replace(/'/g, "\\'").replace(/\n/g, "\\n") + "'";
  }

  function inspect(value, depth, seen) {
    const t = typeof value;
    if (t === "string") return depth === 0 ? value : quote(value);
    if (t === "number") return O.is(value, -0) ? "-0" : S(value);
    if (t === "bigint") return S(value) + "n";
    if (t === "boolean" || t === "undefined") return S(value);
    if (t === "symbol") return value.toString();
    if (t === "function") {
      const name = value.name ? ": " + value.name : " (anonymous)";
      return typeName(value) === "class" ? "[class" + (value.name ? " " + value.name : "") + "]"
        : "[Function" + name + "]";
    }
    if (value === null) return "null";
    if (seen.indexOf(value) >= 0) return "[Circular]";
    if (value instanceof ErrorCtor) return S(value.stack || value);
    if (value instanceof Date) {
      try { return apply(dateISO, value, []); } catch (e) { return "Invalid Date"; }
    }
    if (value instanceof RegExp) return apply(regexpToString, value, []);
    if (depth > 3) return isArray(value) ? "[Array]" : "[" + typeName(value) + "]";
    seen = seen.concat([value]);
    const parts = [];
    const limit = 100;
    let extra = 0;
    let head = "";
    if (isArray(value)) {
      for (let i = 0; i < value.length; i++) {
        if (i >= limit) { extra = value.length - limit; break; }
        push.call(parts, inspect(value[i], depth + 1, seen));
      }
      if (extra) push.call(parts, "... " + extra + " more items");
      return parts.length ? "[ " + apply(join, parts, [", "]) + " ]" : "[]";
    }
    if (value instanceof MapCtor) {
      for (const [k, v] of apply(mapEntries, value, [])) {
        if (parts.length >= limit) { extra++; continue; }
        push.call(parts, inspect(k, depth + 1, seen) + " => " + inspect(v, depth + 1, seen));
      }
      head = "Map(" + value.size + ") ";
    } else if (value instanceof SetCtor) {
      for (const v of apply(setValues, value, [])) {
        if (parts.length >= limit) { extra++; continue; }
        push.call(parts, inspect(v, depth + 1, seen));
      }
      head = "Set(" + value.size + ") ";
    } else {
      const name = typeName(value);
      if (name === "Promise") return "Promise { ... }";
      head = name === "Object" ? "" : name + " ";
      for (const key of keys(value)) {
        if (parts.length >= limit) { extra++; continue; }
        const label = IDENT.test(key) ? key : quote(key);
        push.call(parts, label + ": " + inspect(value[key], depth + 1, seen));
      }
    }
    if (extra) push.call(parts, "... " + extra + " more");
    return head + (parts.length ? "{ " + apply(join, parts, [", "]) + " }" : "{}");
  }

  function show(value) {
    try {
      return inspect(value, 0, []);
    } catch (e) {
      return "[unprintable " + typeName(value) + "]";
    }
  }

  function format(args) {
    const parts = [];
    let i = 0;
    if (typeof args[0] === "string" && args.length > 1 && args[0].indexOf("%") >= 0) {
      i = 1;
      const text = args[0].replace(/%([sdifjoO%])/g, (all, code) => {
        if (code === "%") return "%";
        if (i >= args.length) return all;
        const arg = args[i++];
        if (code === "s") return typeof arg === "string" ? arg : show(arg);
        if (code === "d" || code === "i") {
          return S(code === "i" ? Math.trunc(Number(arg)) : Number(arg));
        }
        if (code === "f") return S(Number(arg));
        if (code === "j") { try { return stringify(arg); } catch (e) { return "[Circular]"; } }
        return inspect(arg, 1, []);
      });
      push.call(parts, text);
    }
    for (; i < args.length; i++) push.call(parts, show(args[i]));
    return apply(join, parts, [" "]);
  }

  function writer(stream) {
    return function (...args) {
      send("write", stream, format(args) + "\n");
    };
  }

  const consoleObject = {
    log: writer(1), info: writer(1), debug: writer(1), dir: writer(1),
    error: writer(2), warn: writer(2), trace: writer(2),
  };

  function text(value) {
    if (typeof value === "string") return value;
    if (value !== null && typeof value === "object" && !(value instanceof ErrorCtor)) {
      try {
        const json = stringify(value);
        if (typeof json === "string") return json;
      } catch (e) {
        // not plain data: fall through to the inspected form
      }
    }
    return show(value);
  }

  function errorText(error) {
    try {
      if (error !== null && typeof error === "object" && typeof error.stack === "string") {
        return error.stack;
      }
      if (error instanceof ErrorCtor) return S(error);
      return "Uncaught " + inspect(error, 1, []);
    } catch (e) {
      return "Uncaught exception (unprintable)";
    }
  }

  function ask(prompts, model) {
    return new PromiseCtor((resolve, reject) => {
      const key = ++nextKey;
      pending.set(key, { resolve, reject, size: prompts.length });
      const problem = send("llm", key, stringify(prompts), model == null ? null : S(model));
      if (problem) {
        pending.delete(key);
        reject(new ErrorCtor("llm_query failed: " + problem));
      }
    });
  }

  // A tool answered by the host (search): its arguments travel as JSON, as given; the
  // promise resolves with the host's result or rejects with "<name> failed: <why>".
  function callTool(name, args) {
    return new PromiseCtor((resolve, reject) => {
      let json;
      try {
        json = stringify(args);
      } catch (e) {
        reject(new ErrorCtor(name + " failed: its arguments are not JSON data"));
        return;
      }
      const key = ++nextKey;
      pending.set(key, { resolve, reject, tool: name });
      const problem = send("tool", key, name, json);
      if (problem) {
        pending.delete(key);
        reject(new ErrorCtor(name + " failed: " + problem));
      }
    });
  }

  function search(query, k) {
    return callTool("search", {
      query: query === undefined ? null : query,
      k: k === undefined ? 10 : k,
    });
  }

  function llm_query(prompt, model) {
    return apply(then, ask([S(prompt)], model), [(answers) => answers[0]]);
  }

  function llm_query_batched(prompts, model) {
    const list = [];
    for (const p of prompts) push.call(list, S(p));
    if (!list.length) return PromiseCtor.resolve([]);
    return ask(list, model);
  }

  let scaffoldNames = new SetCtor();

  function SHOW_VARS() {
    const found = [];
    for (const name of own(G)) {
      if (name[0] === "_" || scaffoldNames.has(name)) continue;
      push.call(found, quote(name) + ": " + quote(typeName(G[name])));
    }
    if (!found.length) return "No variables created yet.";
    return "Available variables: {" + apply(join, found, [", "]) + "}";
  }

  const api = freeze({
    declare(namesJson) {
      for (const name of parse(namesJson)) {
        if (IDENT.test(name) && name !== "${SCAFFOLD_NAME}" && !(name in G)) G[name] = undefined;
      }
    },
    watch(promise) {
      apply(then, promise, [
        () => send("done", null),
        (error) => send("done", errorText(error)),
      ]);
    },
    settle(key) {
      const slot = pending.get(key);
      const reply = send("take");
      if (!slot || typeof reply !== "string") return;
      pending.delete(key);
      const message = parse(reply);
      if (slot.tool) {
        if (message.error != null) slot.reject(new ErrorCtor(slot.tool + " failed: " + S(message.error)));
        else slot.resolve(message.result === undefined ? null : message.result);
        return;
      }
      if (message.error != null) {
        slot.reject(new ErrorCtor("llm_query failed: " + S(message.error)));
        return;
      }
      const results = message.results;
      if (!isArray(results) || results.length !== slot.size) {
        slot.reject(new ErrorCtor("llm_query failed: the host sent a malformed answer"));
        return;
      }
      const answers = [];
      for (const r of results) push.call(answers, S(r));
      slot.resolve(answers);
    },
    abandon(keysJson) {
      for (const key of parse(keysJson)) pending.delete(key);
    },
    loadContext(isText) {
      const raw = send("take");
      const value = isText ? raw : parse(raw);
      G.context = value;
      let chars = 0;
      const count = (v) => {
        if (typeof v === "string") chars += v.length;
        else if (isArray(v)) for (const x of v) count(x);
        else if (v !== null && typeof v === "object") {
          for (const k of keys(v)) { chars += k.length; count(v[k]); }
        } else if (v != null) chars += S(v).length;
      };
      count(value);
      const info = { type: isArray(value) ? "list" : value === null ? "null"
        : typeof value === "string" ? "str" : typeof value === "object" ? "dict" : typeof value,
        chars };
      if (isArray(value) || typeof value === "string") info.length = value.length;
      else if (value !== null && typeof value === "object") info.length = keys(value).length;
      return stringify(info);
    },
    takeFinal() {
      if (!O.prototype.hasOwnProperty.call(G, "__final__")) return null;
      const value = G.__final__;
      delete G.__final__;
      if (value !== null && typeof value === "object" && !isArray(value)) {
        try {
          return stringify(value, (k, v) =>
            typeof v === "bigint" || typeof v === "function" || typeof v === "symbol"
              ? text(v) : v);
        } catch (e) {
          return stringify({ value: text(value) });
        }
      }
      return stringify({ value: text(value) });
    },
    getVar(name) {
      if (!(name in G) || name === "${SCAFFOLD_NAME}") return stringify({ missing: true });
      const value = G[name];
      return stringify({ value: text(value), value_type: typeName(value) });
    },
    markScaffold() {
      scaffoldNames = new SetCtor(own(G));
    },
  });

  delete G.console;
  if (typeof G.ShadowRealm !== "undefined") delete G.ShadowRealm;
  define(G, "console", { value: freeze(consoleObject), writable: true, configurable: true });
  for (const [name, value] of [["context", null], ["llm_query", llm_query],
    ["llm_query_batched", llm_query_batched], ["search", search], ["SHOW_VARS", SHOW_VARS]]) {
    G[name] = value;
  }
  define(G, "${SCAFFOLD_NAME}", { value: api, writable: false, configurable: false });
  api.markScaffold();
  return true;
})`;

// -- top-level declarations (a small JavaScript lexer) ---------------------------------------

const KEYWORDS_BEFORE_EXPRESSION = new Set([
  "return", "typeof", "instanceof", "in", "of", "new", "delete", "void", "throw", "case",
  "do", "else", "yield", "await",
]);
const RESERVED = new Set([
  "await", "break", "case", "catch", "class", "const", "continue", "debugger", "default",
  "delete", "do", "else", "enum", "export", "extends", "false", "finally", "for", "function",
  "if", "import", "in", "instanceof", "let", "new", "null", "return", "static", "super",
  "switch", "this", "throw", "true", "try", "typeof", "var", "void", "while", "with", "yield",
]);
const IDENT_START = /[A-Za-z_$\u0080-\uffff]/;
const IDENT_PART = /[\w$\u0080-\uffff]/;
const PUNCTUATORS = [
  ">>>=", "...", "===", "!==", "**=", "<<=", ">>=", ">>>", "&&=", "||=", "??=",
  "=>", "==", "!=", "<=", ">=", "&&", "||", "??", "?.", "++", "--", "+=", "-=", "*=", "/=",
  "%=", "&=", "|=", "^=", "<<", ">>", "**",
];

/** Tokens of `code`: {type, value, start, end, depth, nl}; comments are skipped. */
function tokenize(code) {
  const tokens = [];
  const stack = []; // "(", "[", "{" or "${" (a template substitution)
  let i = 0;
  let newline = false;
  const n = code.length;
  const last = () => tokens[tokens.length - 1];
  const add = (type, start, end) => {
    const opener = type === "punct" && "([{".includes(code[start]) && end - start === 1;
    const closer = type === "punct" && ")]}".includes(code[start]) && end - start === 1;
    if (closer) stack.pop();
    tokens.push({ type, value: code.slice(start, end), start, end, depth: stack.length, nl: newline });
    if (opener) stack.push(code[start]);
    newline = false;
  };
  const readTemplate = (start) => {
    // from just after "`" or "}" of a substitution, to the closing "`" or an opening "${"
    let j = start;
    while (j < n) {
      const c = code[j];
      if (c === "\\") { j += 2; continue; }
      if (c === "`") return { end: j + 1, open: false };
      if (c === "$" && code[j + 1] === "{") return { end: j + 2, open: true };
      j++;
    }
    return { end: n, open: false };
  };
  const regexAllowed = () => {
    const prev = last();
    if (!prev) return true;
    if (prev.type === "name") return KEYWORDS_BEFORE_EXPRESSION.has(prev.value);
    if (prev.type === "punct") return !(prev.value === ")" || prev.value === "]");
    return false;
  };
  while (i < n) {
    const c = code[i];
    if (c === "\n" || c === "\r" || c === "\u2028" || c === "\u2029") { newline = true; i++; continue; }
    if (c === " " || c === "\t" || c === "\f" || c === "\v" || c === "\ufeff" || c === "\u00a0") { i++; continue; }
    if (c === "/" && code[i + 1] === "/") {
      while (i < n && code[i] !== "\n") i++;
      continue;
    }
    if (c === "/" && code[i + 1] === "*") {
      const close = code.indexOf("*/", i + 2);
      const end = close < 0 ? n : close + 2;
      if (code.slice(i, end).includes("\n")) newline = true;
      i = end;
      continue;
    }
    if (c === "'" || c === '"') {
      let j = i + 1;
      while (j < n && code[j] !== c && code[j] !== "\n") j += code[j] === "\\" ? 2 : 1;
      add("string", i, Math.min(j + 1, n));
      i = j + 1;
      continue;
    }
    if (c === "`") {
      const part = readTemplate(i + 1);
      add("template", i, part.end);
      if (part.open) stack.push("${");
      i = part.end;
      continue;
    }
    if (c === "}" && stack[stack.length - 1] === "${") {
      stack.pop();
      const part = readTemplate(i + 1);
      tokens.push({ type: "template", value: code.slice(i, part.end), start: i, end: part.end,
        depth: stack.length, nl: newline });
      newline = false;
      if (part.open) stack.push("${");
      i = part.end;
      continue;
    }
    if (c === "/" && regexAllowed()) {
      let j = i + 1;
      let inClass = false;
      while (j < n && code[j] !== "\n") {
        const d = code[j];
        if (d === "\\") { j += 2; continue; }
        if (d === "[") inClass = true;
        else if (d === "]") inClass = false;
        else if (d === "/" && !inClass) break;
        j++;
      }
      j++;
      while (j < n && IDENT_PART.test(code[j])) j++;
      add("regex", i, Math.min(j, n));
      i = j;
      continue;
    }
    if (IDENT_START.test(c) || c === "\\" || (c === "#" && IDENT_START.test(code[i + 1] || ""))) {
      let j = i + 1;
      while (j < n && (IDENT_PART.test(code[j]) || code[j] === "\\")) j++;
      add("name", i, j);
      i = j;
      continue;
    }
    if (/[0-9]/.test(c) || (c === "." && /[0-9]/.test(code[i + 1] || ""))) {
      let j = i + 1;
      while (j < n && /[\w.]/.test(code[j])) {
        if ((code[j] === "e" || code[j] === "E") && (code[j + 1] === "+" || code[j + 1] === "-")) j++;
        j++;
      }
      add("number", i, j);
      i = j;
      continue;
    }
    const punct = PUNCTUATORS.find((p) => code.startsWith(p, i)) || c;
    add("punct", i, i + punct.length);
    i += punct.length;
  }
  return tokens;
}

/** True when `token` (at depth 0) begins a statement rather than continues an expression. */
function startsStatement(tokens, index) {
  const prev = tokens[index - 1];
  if (!prev) return true;
  if (prev.type === "punct" && (prev.value === ";" || prev.value === "}")) return true;
  if (!tokens[index].nl) return false;
  if (prev.type === "punct") return prev.value === ")" || prev.value === "]";
  return !KEYWORDS_BEFORE_EXPRESSION.has(prev.value) || prev.type !== "name";
}

/** Collect the names bound by the pattern at `index`; returns the index after it. */
function bindingNames(tokens, index, names) {
  const token = tokens[index];
  if (!token) return index;
  if (token.type === "name") {
    if (!RESERVED.has(token.value)) names.add(token.value);
    return index + 1;
  }
  if (token.value !== "[" && token.value !== "{") return index + 1;
  const inner = token.depth + 1;
  const closer = token.value === "[" ? "]" : "}";
  const object = token.value === "{";
  let i = index + 1;
  while (i < tokens.length && !(tokens[i].depth === token.depth && tokens[i].value === closer)) {
    // one element: [...]name | pattern [= default] | key: pattern [= default] | name [= default]
    if (tokens[i].value === ",") { i++; continue; }
    if (tokens[i].value === "...") i++;
    if (object && tokens[i + 1] && tokens[i + 1].value === ":" && tokens[i + 1].depth === inner) {
      i = bindingNames(tokens, i + 2, names);
    } else if (object && tokens[i].value === "[") {
      while (i < tokens.length && !(tokens[i].depth === inner && tokens[i].value === ":")) i++;
      i = bindingNames(tokens, i + 1, names);
    } else {
      i = bindingNames(tokens, i, names);
    }
    while (i < tokens.length && tokens[i].depth >= inner
      && !(tokens[i].depth === inner && tokens[i].value === ",")) i++;
  }
  return i + 1;
}

/** Where the expression that starts at `index` ends (a `,` or the statement's end at depth 0). */
function skipExpression(tokens, index) {
  let i = index;
  while (i < tokens.length) {
    const t = tokens[i];
    if (t.depth === 0) {
      if (t.value === "," || t.value === ";") return i;
      if (i > index && t.nl && !continuesExpression(tokens[i - 1], t)) return i;
    }
    i++;
  }
  return i;
}

function continuesExpression(prev, next) {
  if (prev.type === "punct" && !(prev.value === ")" || prev.value === "]" || prev.value === "}")) {
    return true;
  }
  if (prev.type === "name" && KEYWORDS_BEFORE_EXPRESSION.has(prev.value)) return true;
  if (next.type === "punct") return !["{", "!", "~", "++", "--"].includes(next.value);
  return next.type === "name" && ["in", "of", "instanceof"].includes(next.value);
}

/**
 * Rewrite the top level of a cell (see the header) and list the names it declares there.
 * Returns {body, names, hoisted}: `hoisted` are function declarations, copied to the global
 * object at the start of the cell.
 */
function rewriteCell(code) {
  const tokens = tokenize(code);
  const names = new Set();
  const hoisted = new Set();
  const edits = []; // [position, deleteCount, insert]
  for (let k = 0; k < tokens.length; k++) {
    const t = tokens[k];
    if (t.depth !== 0 || t.type !== "name") continue;
    const next = tokens[k + 1];
    if (t.value === "var" || t.value === "const"
      || (t.value === "let" && next && (next.type === "name" || next.value === "[" || next.value === "{")
        && startsStatement(tokens, k))) {
      if (t.value !== "var") edits.push([t.start, t.end - t.start, "var"]);
      let i = k + 1;
      while (i < tokens.length) {
        i = bindingNames(tokens, i, names);
        if (tokens[i] && tokens[i].value === "=") i = skipExpression(tokens, i + 1);
        if (tokens[i] && tokens[i].value === "," && tokens[i].depth === 0) { i++; continue; }
        break;
      }
      continue;
    }
    if (!startsStatement(tokens, k)) continue;
    if (t.value === "function" || (t.value === "async" && next && next.value === "function"
      && !next.nl)) {
      let i = t.value === "async" ? k + 2 : k + 1;
      if (tokens[i] && tokens[i].value === "*") i++;
      if (tokens[i] && tokens[i].type === "name") {
        names.add(tokens[i].value);
        hoisted.add(tokens[i].value);
      }
      continue;
    }
    if (t.value === "class" && next && next.type === "name" && next.value !== "extends") {
      let i = k + 2;
      while (i < tokens.length && !(tokens[i].depth === 0 && tokens[i].value === "{")) i++;
      let close = i + 1;
      while (close < tokens.length && !(tokens[close].depth === 0 && tokens[close].value === "}")) {
        close++;
      }
      names.add(next.value);
      edits.push([t.start, 0, `var ${next.value} = `]);
      if (close < tokens.length) edits.push([tokens[close].end, 0, ";"]);
    }
  }
  let body = code;
  edits.sort((a, b) => b[0] - a[0]);
  for (const [position, remove, insert] of edits) {
    body = body.slice(0, position) + insert + body.slice(position + remove);
  }
  return { body, names: [...names], hoisted: [...hoisted] };
}

// -- output capture ---------------------------------------------------------------------------

/** Text that keeps the first `limit` characters and counts the rest. */
class CappedText {
  constructor(limit) {
    this.limit = limit;
    this.parts = [];
    this.kept = 0;
    this.dropped = 0;
  }

  write(text) {
    const room = this.limit - this.kept;
    if (room > 0) {
      const piece = text.slice(0, room);
      this.parts.push(piece);
      this.kept += piece.length;
    }
    this.dropped += Math.max(0, text.length - Math.max(room, 0));
  }

  value() {
    let text = this.parts.join("");
    if (this.dropped) text += `\n[... ${this.dropped} more characters truncated ...]\n`;
    return text;
  }
}

function truncate(text, limit) {
  if (text.length <= limit) return text;
  return text.slice(0, limit) + `\n[... ${text.length - limit} more characters truncated ...]\n`;
}

/** A user error: its message and only the frames of user code (not the cell's wrapper). */
function userError(text, wrapperFrame) {
  const lines = String(text).split("\n");
  const firstFrame = lines.findIndex((line) => /^\s+at /.test(line));
  if (firstFrame < 0) return text;
  const head = lines.slice(0, firstFrame);
  const frames = lines.slice(firstFrame).filter(
    (line) => line.includes("<cell-") && !(wrapperFrame && line.includes(wrapperFrame)),
  );
  return [...head, ...frames].join("\n");
}

// -- the server -------------------------------------------------------------------------------

class Server {
  constructor() {
    this.queue = [];
    this.busy = false;
    this.cell = 0;
    this.exec = null; // the running execution
    this.inbox = null; // a string the scaffold takes with bridge("take")
    this.llmCounter = 0;
    this.requests = new Map(); // llm_request / tool_request id -> {key, exec}
    this.stdinClosed = false;
    this.context = vm.createContext(Object.create(null), {
      name: "repl",
      codeGeneration: { strings: false, wasm: false },
      microtaskMode: "afterEvaluate",
    });
    const setup = new vm.Script(SCAFFOLD, { filename: "<scaffold>" }).runInContext(this.context);
    setup((kind, a, b, c) => this.bridge(kind, a, b, c));
    this.watcher = new vm.Script(`(p) => ${SCAFFOLD_NAME}.watch(p)`, { filename: "<scaffold>" })
      .runInContext(this.context);
    this.drain = new vm.Script("undefined", { filename: "<scaffold>" });
  }

  send(message) {
    process.stdout.write(JSON.stringify(message) + "\n");
  }

  /** Send one request line, unless it is over the host's limit: then say why (refused). */
  sendRequest(message) {
    const line = JSON.stringify(message) + "\n";
    const size = Buffer.byteLength(line, "utf8");
    if (size > MAX_LINE_BYTES) {
      return `the request is ${(size / 1048576).toFixed(1)} MiB; at most ${MAX_LINE_BYTES / 1048576} MiB travel in one call (send less at once)`;
    }
    process.stdout.write(line);
    return undefined;
  }

  /** The one host entry point of the scaffold: primitives in, primitives out, never throws. */
  bridge(kind, a, b, c) {
    try {
      if (kind === "write") {
        if (this.exec && !this.exec.finished) (a === 2 ? this.exec.err : this.exec.out).write(String(b));
        else process.stderr.write(String(b));
        return undefined;
      }
      if (kind === "take") {
        const value = this.inbox;
        this.inbox = null;
        return typeof value === "string" ? value : undefined;
      }
      if (kind === "llm") return this.requestLLM(Number(a), String(b), c == null ? null : String(c));
      if (kind === "tool") return this.requestTool(Number(a), String(b), String(c));
      if (kind === "done") {
        const exec = this.exec;
        if (exec && !exec.finished && !exec.outcome) exec.outcome = { error: a == null ? null : String(a) };
        return undefined;
      }
    } catch (error) {
      process.stderr.write(`bridge ${kind} failed: ${error && error.stack}\n`);
    }
    return undefined;
  }

  requestLLM(key, promptsJson, model) {
    const exec = this.exec;
    if (this.stdinClosed) return "the host closed the channel";
    if (!exec || exec.finished) return "no execution is running";
    this.llmCounter += 1;
    const id = `${exec.id}.llm.${this.llmCounter}`;
    const problem = this.sendRequest(
      { type: "llm_request", id, exec_id: exec.id, prompts: JSON.parse(promptsJson), model });
    if (problem) return problem;
    this.requests.set(id, { key, exec });
    exec.keys.push(key);
    return undefined;
  }

  requestTool(key, tool, argsJson) {
    const exec = this.exec;
    if (this.stdinClosed) return "the host closed the channel";
    if (!exec || exec.finished) return "no execution is running";
    this.llmCounter += 1;
    const id = `${exec.id}.tool.${this.llmCounter}`;
    const problem = this.sendRequest(
      { type: "tool_request", id, exec_id: exec.id, tool, args: JSON.parse(argsJson) });
    if (problem) return problem;
    this.requests.set(id, { key, exec });
    exec.keys.push(key);
    return undefined;
  }

  /** Run a scaffold call in the context with a time limit; returns its primitive result. */
  call(source, timeoutMs) {
    const options = timeoutMs === undefined ? {} : { timeout: Math.max(1, Math.ceil(timeoutMs)) };
    const value = new vm.Script(source, { filename: "<scaffold>" }).runInContext(this.context, options);
    return typeof value === "string" || typeof value === "boolean" ? value : null;
  }

  remainingMs(exec) {
    return exec.deadline === null ? undefined : exec.deadline - Date.now();
  }

  // -- reading --------------------------------------------------------------------------------

  onLine(line) {
    if (!line.trim()) return;
    let message;
    try {
      message = JSON.parse(line);
    } catch (error) {
      this.send({ type: "error", id: null, error: `bad JSON: ${error.message}` });
      return;
    }
    if (message === null || typeof message !== "object" || Array.isArray(message)) {
      this.send({ type: "error", id: null, error: "not a JSON object" });
      return;
    }
    if (message.type === "llm_result" || message.type === "tool_result") {
      this.deliverReply(message);
      return;
    }
    this.queue.push(message);
    this.pump();
  }

  onEnd() {
    // nobody is left to read a reply: stop now, even in the middle of an execution
    this.stdinClosed = true;
    process.exit(0);
  }

  pump() {
    while (!this.busy && this.queue.length) {
      this.handle(this.queue.shift());
    }
  }

  // -- requests -------------------------------------------------------------------------------

  handle(message) {
    const kind = message.type;
    const id = message.id === undefined ? null : message.id;
    try {
      if (kind === "exec" || kind === "exec_prelude") {
        if (typeof message.code !== "string") throw new Error("missing field 'code'");
        this.startExec(message, kind === "exec_prelude");
      } else if (kind === "load_context") {
        this.send({ type: "result", id, ...this.loadContext(message) });
      } else if (kind === "get_var") {
        if (typeof message.name !== "string") throw new Error("missing field 'name'");
        this.send({ type: "var", id, ...this.getVar(message.name) });
      } else if (kind === "shutdown") {
        this.busy = true;
        process.stdout.write(JSON.stringify({ type: "bye", id }) + "\n", () => process.exit(0));
      } else {
        this.send({ type: "error", id, error: `unknown message type ${JSON.stringify(kind)}` });
      }
    } catch (error) {
      this.send({ type: "error", id, error: `${error.name || "Error"}: ${error.message}` });
    }
  }

  loadContext(message) {
    const started = process.hrtime.bigint();
    let raw;
    let isText = false;
    if (Object.prototype.hasOwnProperty.call(message, "data")) {
      raw = JSON.stringify(message.data === undefined ? null : message.data);
    } else {
      if (typeof message.path !== "string") throw new Error("missing field 'path' or 'data'");
      isText = (message.format || "json") === "text";
      raw = fs.readFileSync(message.path, "utf8");
    }
    this.inbox = raw;
    const info = this.call(`${SCAFFOLD_NAME}.loadContext(${isText})`);
    this.inbox = null;
    return {
      stdout: "", stderr: "", error: null, timed_out: false, final: null,
      duration_s: seconds(started),
      info: info ? JSON.parse(info) : {},
    };
  }

  getVar(name) {
    const reply = this.call(`${SCAFFOLD_NAME}.getVar(${JSON.stringify(name)})`, HELPER_TIMEOUT_MS);
    const parsed = reply ? JSON.parse(reply) : { missing: true };
    if (parsed.missing) {
      return { name, value: null, value_type: null, error: `no variable '${name}'` };
    }
    const value = typeof parsed.value === "string" ? truncate(parsed.value, MAX_FINAL_CHARS) : parsed.value;
    return { name, value, value_type: parsed.value_type, error: null };
  }

  startExec(message, prelude) {
    this.cell += 1;
    const limit = Number(message.max_output_chars) || DEFAULT_MAX_OUTPUT_CHARS;
    const timeout = prelude ? null : Number(message.timeout_s) || null;
    const exec = {
      id: message.id === undefined ? null : message.id,
      prelude,
      limit,
      timeout,
      out: new CappedText(limit),
      err: new CappedText(limit),
      outcome: null, // {error} once the cell's promise settled
      finished: false,
      keys: [],
      started: process.hrtime.bigint(),
      deadline: timeout ? Date.now() + timeout * 1000 : null,
      timer: null,
    };
    this.exec = exec;
    this.llmCounter = 0;
    this.busy = true;
    let script;
    let names = [];
    try {
      if (DYNAMIC_IMPORT.test(message.code)) {
        this.finishExec("SyntaxError: import() is not available in this REPL (no module can be loaded)", false);
        return;
      }
      const cell = rewriteCell(message.code);
      names = cell.names;
      const copies = cell.hoisted.map((name) => `this[${JSON.stringify(name)}] = ${name}; `);
      const source = `(async () => { with (this) { ${copies.join("")}${cell.body}\n} })()`;
      script = new vm.Script(source, { filename: `<cell-${this.cell}>` });
      exec.wrapperFrame = `<cell-${this.cell}>:${cell.body.split("\n").length + 1}:`;
    } catch (error) {
      this.finishExec(syntaxErrorText(error), false);
      return;
    }
    if (timeout) exec.timer = setTimeout(() => this.timeoutExec(exec), timeout * 1000);
    this.inContext(exec, () => {
      this.call(`${SCAFFOLD_NAME}.declare(${JSON.stringify(JSON.stringify(names))})`, HELPER_TIMEOUT_MS);
      const promise = script.runInContext(this.context, this.runOptions(exec));
      // attaching the handlers runs no user code; the drain that follows runs the reactions
      // (and "done" if the cell has ended) under the time limit
      this.watcher(promise);
      this.drain.runInContext(this.context, this.runOptions(exec));
    });
  }

  /** Run `work` (vm calls that may run user code) and settle the execution afterwards. */
  inContext(exec, work) {
    try {
      work();
    } catch (error) {
      if (!exec.finished) {
        if (isTimeout(error)) this.timeoutExec(exec);
        else this.finishExec(`Error: ${error && error.message}`, false);
      }
      return;
    }
    if (exec.outcome && !exec.finished) this.finishExec(exec.outcome.error, false);
  }

  runOptions(exec) {
    const left = this.remainingMs(exec);
    return left === undefined ? {} : { timeout: Math.max(1, Math.ceil(left)) };
  }

  timeoutExec(exec) {
    if (exec.finished) return;
    this.finishExec(
      `TimeoutError: execution exceeded ${exec.timeout} s and was interrupted`,
      true,
    );
  }

  deliverReply(message) {
    const request = this.requests.get(String(message.id));
    if (!request) return;
    this.requests.delete(String(message.id));
    const { key, exec } = request;
    if (exec.finished) return;
    this.inbox = JSON.stringify({
      results: message.results === undefined ? null : message.results,
      result: message.result === undefined ? null : message.result,
      error: message.error === undefined ? null : message.error,
    });
    this.inContext(exec, () => this.call(`${SCAFFOLD_NAME}.settle(${Number(key)})`, this.remainingMs(exec)));
    this.inbox = null;
  }

  finishExec(errorText, timedOut) {
    const exec = this.exec;
    if (!exec || exec.finished) return;
    exec.finished = true;
    if (exec.timer) clearTimeout(exec.timer);
    for (const [id, request] of this.requests) {
      if (request.exec === exec) this.requests.delete(id);
    }
    let final = null;
    // reading __final__ may run user getters: bounded by what is left of the execution
    const left = this.remainingMs(exec);
    const limit = left === undefined ? HELPER_TIMEOUT_MS : Math.max(FINISH_MIN_MS, left);
    try {
      if (exec.keys.length) {
        this.call(`${SCAFFOLD_NAME}.abandon(${JSON.stringify(JSON.stringify(exec.keys))})`, limit);
      }
      const raw = this.call(`${SCAFFOLD_NAME}.takeFinal()`, limit);
      final = raw ? JSON.parse(raw) : null;
      if (final && typeof final.value === "string") final.value = truncate(final.value, MAX_FINAL_CHARS);
      if (exec.prelude) this.call(`${SCAFFOLD_NAME}.markScaffold()`, limit);
    } catch (error) {
      if (errorText == null) errorText = `Error: reading the final answer failed: ${error && error.message}`;
    }
    const error = errorText == null ? null
      : truncate(userError(errorText, exec.wrapperFrame), exec.limit);
    this.send({
      type: "result",
      id: exec.id,
      stdout: exec.out.value(),
      stderr: exec.err.value(),
      error,
      timed_out: timedOut,
      final,
      duration_s: seconds(exec.started),
      info: {},
    });
    this.exec = null;
    // leave the current call stack (which may be inside a vm call) before the next request
    setImmediate(() => {
      this.busy = false;
      this.pump();
    });
  }

  serve() {
    // a promise of user code rejected with nobody listening must not end the server
    process.on("unhandledRejection", () => {});
    process.stdin.setEncoding("utf8");
    let buffer = "";
    process.stdin.on("data", (chunk) => {
      buffer += chunk;
      let newline = buffer.indexOf("\n");
      while (newline >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        this.onLine(line);
        newline = buffer.indexOf("\n");
      }
    });
    process.stdin.on("end", () => {
      if (buffer.trim()) this.onLine(buffer);
      this.onEnd();
    });
    const runtime = typeof Bun !== "undefined" ? `bun ${Bun.version}` : `node ${process.versions.node}`;
    this.send({ type: "ready", protocol: PROTOCOL_VERSION, runtime, pid: process.pid });
  }
}

function isTimeout(error) {
  return Boolean(error) && (error.code === "ERR_SCRIPT_EXECUTION_TIMEOUT"
    || /Script execution timed out/.test(String(error.message)));
}

function syntaxErrorText(error) {
  const stack = String((error && error.stack) || error);
  const frame = stack.search(/\n\s+at /);
  return frame < 0 ? stack : stack.slice(0, frame);
}

function seconds(started) {
  return Math.round(Number(process.hrtime.bigint() - started) / 1000) / 1e6;
}

if (require.main === module || module.id === "[eval]") {
  new Server().serve();
}

module.exports = { rewriteCell, tokenize };
