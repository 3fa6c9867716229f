// Every exported function, class, and public method or accessor of an exported class under
// the given directory carries a doc comment (docs/architecture.md, "Conventions"). Run by
// `npm run lint`; prints each one missing and exits 1.
import ts from "typescript";
import { readFileSync, readdirSync, statSync } from "node:fs";
import { join, relative } from "node:path";

/** @param {string} dir */
function tsFiles(dir) {
  /** @type {string[]} */
  const out = [];
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...tsFiles(path));
    else if (path.endsWith(".ts") && !path.endsWith(".d.ts")) out.push(path);
  }
  return out;
}

/** @param {ts.Node} node */
const documented = (node) => ts.getJSDocCommentsAndTags(node).length > 0;
/** @param {ts.Declaration} node */
const exported = (node) => (ts.getCombinedModifierFlags(node) & ts.ModifierFlags.Export) !== 0;

/** @type {string[]} */
const missing = [];
for (const file of tsFiles(process.argv[2] ?? "src")) {
  const src = ts.createSourceFile(file, readFileSync(file, "utf8"), ts.ScriptTarget.Latest, true);
  /** @param {ts.Node} node @param {string} what */
  const report = (node, what) => {
    const { line } = src.getLineAndCharacterOfPosition(node.getStart(src));
    missing.push(`${relative(process.cwd(), file)}:${line + 1}: ${what}`);
  };
  // Overloads share one doc comment: a name is documented when any of its declarations is.
  /** @type {Map<string, ts.Node[]>} */
  const functions = new Map();
  for (const st of src.statements) {
    if (ts.isFunctionDeclaration(st) && st.name && exported(st)) {
      functions.set(st.name.text, [...(functions.get(st.name.text) ?? []), st]);
    }
    if (ts.isVariableStatement(st) && exported(st) && !documented(st)) {
      for (const d of st.declarationList.declarations) {
        const init = d.initializer;
        if (init && (ts.isArrowFunction(init) || ts.isFunctionExpression(init))) {
          report(st, `function ${d.name.getText(src)}`);
        }
      }
    }
    if (ts.isClassDeclaration(st) && exported(st)) {
      const cls = st.name?.text ?? "default";
      if (!documented(st)) report(st, `class ${cls}`);
      /** @type {Set<string>} */
      const accessorsWithDoc = new Set();
      for (const m of st.members) {
        if ((ts.isGetAccessor(m) || ts.isSetAccessor(m)) && documented(m)) {
          accessorsWithDoc.add(m.name.getText(src));
        }
      }
      for (const m of st.members) {
        if (m.name && ts.isPrivateIdentifier(m.name)) continue;
        const flags = ts.getCombinedModifierFlags(m);
        if (flags & (ts.ModifierFlags.Private | ts.ModifierFlags.Protected)) continue;
        if (ts.isConstructorDeclaration(m)) {
          if (m.parameters.length > 0 && m.body && !documented(m)) report(m, `${cls} constructor`);
        } else if (ts.isMethodDeclaration(m) && m.body && !documented(m)) {
          report(m, `${cls}.${m.name.getText(src)}`);
        } else if (ts.isGetAccessor(m) || ts.isSetAccessor(m)) {
          if (!accessorsWithDoc.has(m.name.getText(src)))
            report(m, `${cls}.${m.name.getText(src)}`);
        }
      }
    }
  }
  for (const [name, decls] of functions) {
    if (!decls.some(documented)) report(decls[0], `function ${name}`);
  }
}

if (missing.length > 0) {
  console.error(`doc comment missing on ${missing.length} exported declaration(s):`);
  for (const m of missing) console.error(`  ${m}`);
  process.exit(1);
}
