// A clock the tests move by hand: the client's timers (backoff, pacing, ack timeouts,
// typing) fire only when the test advances it, so timing is checked without waiting.

export class FakeClock {
  #now = 0;
  #nextId = 1;
  /** @type {Map<number, {at: number, fn: () => void}>} */
  #timers = new Map();

  now() {
    return this.#now;
  }

  setTimeout(fn, ms) {
    const id = this.#nextId++;
    this.#timers.set(id, { at: this.#now + Math.max(0, ms), fn });
    return id;
  }

  clearTimeout(id) {
    this.#timers.delete(id);
  }

  /** Delays (from now) of the timers still pending, soonest first. */
  pending() {
    return [...this.#timers.values()].map((t) => t.at - this.#now).sort((a, b) => a - b);
  }

  /** Move time forward by `ms`, running every timer that falls due, in order. */
  advance(ms) {
    const end = this.#now + ms;
    for (;;) {
      let nextId = null;
      let next = null;
      for (const [id, timer] of this.#timers) {
        if (timer.at <= end && (next === null || timer.at < next.at)) {
          nextId = id;
          next = timer;
        }
      }
      if (next === null) break;
      this.#timers.delete(nextId);
      this.#now = next.at;
      next.fn();
    }
    this.#now = end;
  }
}
