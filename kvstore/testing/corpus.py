"""English text written for this project, for tests and benchmarks with a real model.

One long essay on a single subject (lighthouses and the people who kept them), so
that a continuation depends on its context: a model reading the second half
does better with the exact KV of the first half than with a damaged one, which
is what the codec benchmarks measure.  About 2,800 tokens with the SmolLM2
tokenizer.  Original text, free to ship with the project (Apache-2.0).
"""

from __future__ import annotations

PARAGRAPHS: tuple[str, ...] = (
    "For most of recorded history, the most dangerous part of any sea voyage was not the open ocean but "
    "the last few miles before reaching harbor. Out on deep water a ship could ride out a storm with room "
    "to spare, but near the coast every wave pushed it toward rocks, sandbars and reefs that a sailor could "
    "not see at night. The lighthouse grew out of that simple fact. Long before anyone built a tower, people "
    "living along dangerous shores lit fires on hilltops so that returning fishing boats could find the "
    "entrance to a bay. Those fires were unreliable, they burned a great deal of wood, and they went out in "
    "the rain, yet for centuries they were the only help a sailor could expect once the sun went down.",
    "The most famous early lighthouse stood on the island of Pharos, at the entrance to the harbor of "
    "Alexandria in Egypt. Built in the third century before the common era, it rose more than a hundred "
    "meters above the water and was counted among the wonders of the ancient world. Travelers described a "
    "square base, an octagonal middle section and a round top where a fire burned at night. Some accounts "
    "claim that a great mirror of polished bronze reflected the light far out to sea, although historians "
    "still argue about how much of that story is true. The tower survived for well over a thousand years "
    "before a series of earthquakes brought it down, and its stones were later used to build a fortress on "
    "the same site. The word for lighthouse in several languages still comes from the name of that island.",
    "The Romans built lighthouses wherever their ships traded, from the coast of Spain to the cliffs of "
    "Dover, where the ruins of one Roman tower still stand inside the walls of a medieval castle. After the "
    "empire fell, however, very few new lights were built for several hundred years. Trade along the coasts "
    "of Europe shrank, and the towns that did keep a light usually relied on monks or on a local guild of "
    "merchants to pay for the fuel. A light was often a private business: the owner collected a small fee "
    "from every ship that entered the port, and in return promised to keep the fire burning. Sailors "
    "complained bitterly that many owners took the money and let the fire die as soon as the weather turned "
    "bad, which was exactly when it was needed most.",
    "The great age of lighthouse building began in the eighteenth century, when growing trade filled the "
    "sea lanes with ships and governments decided that safe coasts were a public duty rather than a private "
    "venture. Engineers faced problems that no one had solved before. A tower on a headland was easy enough, "
    "but the worst dangers were reefs that lay far out in the water and were covered at high tide. Building "
    "on such a rock meant working only a few hours a day, at low tide and in calm weather, with the "
    "knowledge that a single storm could sweep away a whole season of work. The first tower on one notorious "
    "reef off the south coast of England was made of wood and was destroyed, together with its builder, in "
    "a great storm only a few years after it was finished.",
    "The engineer who finally solved the problem of the wave-swept rock was a maker of scientific instruments "
    "who had never built anything in stone. He studied the way an old oak tree stands against the wind, "
    "wide at the base and narrowing as it rises, and he shaped his tower the same way. Each block of granite "
    "was cut so that it locked into the blocks around it and below it, like the pieces of a puzzle, so that "
    "the whole tower behaved like a single piece of rock. He also tested many kinds of mortar and found one "
    "that would set under water, a discovery that later helped engineers all over the world. His tower stood "
    "for more than a century, and it was taken down only because the rock beneath it had begun to crack; "
    "the upper part was rebuilt on land, where visitors can still climb it today.",
    "A tower is only half of a lighthouse; the other half is the light. For a long time the light itself was "
    "the weak part. Coal fires in open braziers produced a great deal of smoke and very little useful light, "
    "and candles were not much better. The first real improvement came with oil lamps that used a hollow "
    "circular wick, which let air reach both sides of the flame so that it burned hotter and brighter. "
    "Engineers placed a curved metal reflector behind each lamp to send the light toward the horizon instead "
    "of letting it escape into the sky. A lighthouse might carry twenty or thirty of these lamps, each with "
    "its own reflector, arranged on a frame so that together they covered the whole stretch of water that "
    "ships had to cross.",
    "The decisive step came from a French physicist who was studying the nature of light itself. He worked "
    "out that a large glass lens could gather far more of a flame's light than any mirror, but a solid lens "
    "big enough for a lighthouse would have been impossibly thick and heavy, and it would have cracked as it "
    "cooled. His answer was to cut the lens into a series of thin concentric rings, each ring bending the "
    "light by just the right amount, so that the whole lens had the power of a thick one with only a "
    "fraction of the glass. Prisms set above and below the central rings caught the light that would "
    "otherwise have been lost upward and downward. The result was a beehive of glass taller than a person, "
    "which could send a beam twenty miles or more from a single lamp.",
    "These lenses were made in several sizes, called orders, from the enormous first order lenses used on "
    "major seacoast lights to the small sixth order lenses placed at the ends of piers and in quiet harbors. "
    "A first order lens could weigh several tons and contain more than a thousand pieces of glass, each "
    "ground and polished by hand. The makers, mostly in France and later in Britain, shipped them across the "
    "world in wooden crates packed with straw, and a crew of specialists traveled with them to assemble the "
    "lens inside the lantern room. Many of those lenses are still in place, and some are still in service, "
    "more than a century and a half after they were installed.",
    "A fixed light solves only part of the sailor's problem. On a coast with several lighthouses, a captain "
    "who sees a light in the distance must also know which lighthouse it is, because mistaking one for "
    "another can be as dangerous as seeing no light at all. Engineers therefore gave each light its own "
    "character. Some lights flashed, some were steady, some showed a group of two or three flashes followed "
    "by a long dark pause, and some showed red or green in certain directions to mark a dangerous sector. "
    "To make a light flash, the whole lens was mounted on a turntable and rotated by a clockwork driven by a "
    "heavy falling weight. Later, to let the heavy lens turn smoothly and quickly, it was floated on a bath "
    "of mercury, so that a push of one finger could set several tons of glass in motion.",
    "Behind every light stood the keepers. Their work was simple to describe and hard to do. Every evening, "
    "shortly before sunset, they lit the lamp, and every morning they put it out. During the night they "
    "climbed the stairs again and again to trim the wick, refill the oil, wind the clockwork and check that "
    "nothing had gone wrong. In the daytime they cleaned the soot from the lens and the lantern windows, "
    "polished the brass, painted the tower and wrote up the log book, in which every change in the weather "
    "and every passing ship was recorded. On most stations there were two or three keepers who took turns "
    "through the night, because a light that failed even for an hour could cost a ship and its crew.",
    "Life on a rock station far out at sea was very different from life at a lighthouse on the mainland. "
    "A keeper on the mainland usually lived in a cottage next to the tower with his family, kept a garden "
    "and a few animals, and sent his children to the village school. A keeper on a rock lived in a stone "
    "cylinder with two or three other men, sleeping in curved bunks that followed the wall of the tower, "
    "and he might not set foot on land for a month or more. Supply boats came when the weather allowed, "
    "which in winter could mean weeks of waiting. Keepers passed the time by reading, carving, making "
    "models of ships, fishing from the gallery and, in some cases, by quarreling with each other.",
    "Many of the keepers were women. When a keeper died, his widow often took over the light, since she "
    "already knew the work as well as he did, and some women kept lights for most of their lives. The "
    "records of those stations are full of quiet heroism: a keeper who rowed out in a storm to rescue the "
    "survivors of a wreck, another who kept her light burning for weeks while she was ill because there "
    "was no one else to do it, a young daughter who climbed the tower alone on a winter night when both "
    "her parents were trapped on the mainland by the tide. Newspapers sometimes turned such stories into "
    "legends, but the plain entries in the log books are often more moving than the legends.",
    "The fuel changed several times. Whale oil was used for many years until it became too expensive, and "
    "then engineers tried oils pressed from seeds, lard heated until it flowed, and finally kerosene, which "
    "burned brightly and cheaply. A new kind of burner, in which kerosene was turned into vapor and burned "
    "inside a glowing mantle, made lights several times brighter without any change to the lens. Each new "
    "fuel meant new lamps, new routines and new dangers, because kerosene vapor could catch fire and "
    "explode. Keepers had to learn the new equipment from printed instructions and from the inspectors "
    "who visited each station a few times a year to check the work and to write reports on the keepers.",
    "Electric light arrived at the end of the nineteenth century, but it spread slowly, because most "
    "lighthouses stood far from any power line. Stations on the mainland were connected first; remote "
    "stations had to make their own electricity with engines and generators, which added engine oil and "
    "spare parts to the list of supplies the boats had to bring. At the same time other inventions "
    "changed the work. Fog signals, first bells and guns and later great horns driven by compressed air, "
    "warned ships when the light could not be seen. Radio beacons let a ship find its position in thick "
    "weather without seeing the coast at all, and the keeper's duties grew to include the care of all "
    "of these machines.",
    "In the twentieth century engineers began to ask whether the keepers were needed at all. A light "
    "that could switch itself on at dusk and off at dawn, change its own bulb when one burned out, and "
    "report a fault by radio did not need three people living beside it. Automation came to most "
    "lighthouses between the nineteen sixties and the end of the century. The last keepers left their "
    "stations, often in a small ceremony with a flag lowered for the last time, and the lights went on "
    "shining without them. Today a handful of technicians look after dozens of lights, visiting each one "
    "a few times a year by boat or by helicopter, much as the inspectors once did.",
    "Satellite navigation has changed the picture again. A modern ship knows its position to within a "
    "few meters at every moment, and its electronic charts show every rock and every shoal along the "
    "coast. Some people argue that lighthouses are no longer needed, and a number of lights have indeed "
    "been switched off. Others point out that electronic systems can fail, that small boats often carry "
    "no such equipment, and that a light on a headland can be seen by anyone with working eyes. For now "
    "most maritime authorities keep the major lights burning, though many have replaced the old lamps "
    "and lenses with small, efficient lights that run on solar power and need very little care.",
    "The old towers themselves have found new lives. Many have become museums, where visitors climb the "
    "spiral stairs and stand in the lantern room beside a lens that once threw its beam across the sea. "
    "Some keepers' cottages have been turned into holiday homes, so that people can spend a week in the "
    "same rooms where a keeper's family once lived, listening to the same wind and the same waves. Local "
    "societies raise money to repaint the towers and repair the stonework, and volunteers guide visitors "
    "and tell the stories of the keepers who served there. In a few places the old light has even been "
    "relit, not for ships but for the people of the town, who had missed its familiar flash at night.",
    "What draws people to lighthouses is perhaps not the engineering, impressive as it is, but the idea "
    "they represent. A lighthouse stands at the edge of the land and looks out at the most dangerous "
    "water, and it asks nothing of the ships it protects. It does not know their names or their cargo; it "
    "simply shines for anyone who needs it. For the keepers, the work was often lonely and dull, a matter "
    "of soot, oil, brass and log books, yet most of them spoke of it with pride. They knew that somewhere "
    "out in the dark a captain was looking for their light, and that as long as it burned, that captain "
    "would know where he was and which way to steer.",
    "Anyone who visits an old light station today can still read that story in the buildings. The oil "
    "house stands a little apart from the tower, because the keepers feared fire above everything else. "
    "The windows of the lantern are set in diagonal frames, so that no single bar blocks the beam in any "
    "direction. The stairs are worn in the middle of every step by generations of boots carrying oil "
    "cans up and ashes down. And in the log book, if the museum still has it, the last entry is often "
    "the same as the first: the time the light was lit, the state of the weather, and the words that "
    "every keeper wrote at the end of every night, that all was well.",
)
"""The essay, one paragraph per item, in reading order."""

TEXT: str = "\n\n".join(PARAGRAPHS)
"""The whole essay as one string."""
