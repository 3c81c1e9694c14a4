// Types of the ESM entry point (index.mjs): the same as index.d.ts, plus a default export
// holding them all.
export * from './index.js';
declare const elector: typeof import('./index.js');
export default elector;
